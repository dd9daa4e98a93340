"""A seeded synthetic mix of injected PII and PII look-alikes, and a scorer for any redactor.

The ``pii`` stage's acceptance figures (share of injected PII removed, share of look-alikes
altered) are measured on this mix, by the tests and by ``benchmarks/pii_vs_datatrove.py`` alike.
Each item sits in its own paragraph of plain filler words (no digits, no ``@``), so a
paragraph changed by the redactor can only have been changed because of its item.

Injected values are valid by construction: card numbers carry a Luhn check digit and a real
issuer prefix, IBANs their mod-97 check digits, phones are numbers libphonenumber holds valid,
IPs are public (``ipaddress.is_global``). Look-alikes are what a careless detector would hit:
versions, ISBNs, dates, UUIDs, hex digests, card-shaped numbers failing Luhn, private IPs,
SSNs with unissued areas, IBANs with wrong check digits, code that only mentions secrets.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

PARAGRAPH = "\n\n"
_WORDS = (
    "the report lists several entries for review and the team will check each one before the "
    "meeting while notes from earlier drafts remain attached below for anyone who needs context "
    "about this matter our records show it was updated recently please see"
).split()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PLAIN_SENTENCE = re.compile(r"(?:[^\W\d_]|[ ,;'()-])+[.!?]")  # letters of any script, spaces, plain punctuation


@dataclass(frozen=True)
class Item:
    """One injected value. ``kind`` is a PII kind or a look-alike class; ``secret`` must vanish."""

    kind: str
    paragraph: str
    secret: str
    is_pii: bool


@dataclass
class MixScore:
    removed: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    altered: Counter[str] = field(default_factory=Counter)
    lookalikes: Counter[str] = field(default_factory=Counter)

    @property
    def removed_share(self) -> float:
        return sum(self.removed.values()) / max(1, sum(self.injected.values()))

    @property
    def altered_share(self) -> float:
        return sum(self.altered.values()) / max(1, sum(self.lookalikes.values()))

    def table(self) -> str:
        lines = ["| kind | items | removed | altered |", "|---|---|---|---|"]
        for kind in sorted(self.injected):
            lines.append(f"| {kind} (PII) | {self.injected[kind]} | {self.removed[kind]} | |")
        for kind in sorted(self.lookalikes):
            lines.append(f"| {kind} (look-alike) | {self.lookalikes[kind]} | | {self.altered[kind]} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- PII values


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    while True:  # generated credentials always mix letters and digits, like real ones
        value = "".join(rng.choice(alphabet) for _ in range(n))
        if re.search(r"\d", value) and re.search(r"[A-Za-z]", value):
            return value


def email(rng: random.Random) -> str:
    first, last = rng.choice(["anna", "li", "omar", "jose", "mei", "kofi"]), rng.choice(["smith", "garcia", "ng", "okafor"])
    local = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first[0]}{last}+news", first])
    return f"{local}@{rng.choice(['example.com', 'mail.example.org', 'uni-berlin.de', 'corp.co.uk', 'dev.io'])}"


_US_FORMATS = ("({a}) {e}-{x}", "{a}-{e}-{x}", "{a}.{e}.{x}", "+1 {a} {e} {x}", "1-{a}-{e}-{x}", "+1 ({a}) {e}-{x}")
_PHONE_REGIONS = ("GB", "DE", "FR", "IN", "JP", "AU", "BR", "ES", "IT", "NL", "MX", "ZA")


def phone(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.5:
            a, e, x = f"{rng.choice('2345689')}{_digits(rng, 2)}", f"{rng.randint(2, 9)}{_digits(rng, 2)}", _digits(rng, 4)
            text = rng.choice(_US_FORMATS).format(a=a, e=e, x=x)
            number = phonenumbers.parse(text, "US")
        else:
            region = rng.choice(_PHONE_REGIONS)
            kind = rng.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            number = phonenumbers.PhoneNumber()
            number.merge_from(example)
            number.national_number = int(str(example.national_number)[:-4] + _digits(rng, 4))
            text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        if phonenumbers.is_valid_number(number):
            return text


def public_ip(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.7:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(rng.getrandbits(32))
        else:
            bits = 0x2 << 124 | rng.getrandbits(125)  # global unicast, 2000::/3
            if rng.random() < 0.5:  # a /48 prefix and a short host part, printed with "::"
                bits = bits >> 80 << 80 | bits & 0xFFFF
            ip = ipaddress.IPv6Address(bits)
        if ip.is_global and not ip.is_multicast:
            return str(ip)


_CARD_PREFIXES = (("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16), ("65", 16), ("36", 14), ("3530", 16))


def _with_check_digit(body: str) -> str:
    return body + luhn.calc_check_digit(body)


def card_digits(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_PREFIXES)
    return _with_check_digit(prefix + _digits(rng, length - len(prefix) - 1))


def format_card(rng: random.Random, digits: str) -> str:
    sep = rng.choice([" ", "-", ""])
    if len(digits) == 16:
        groups = [digits[i : i + 4] for i in range(0, 16, 4)]
    else:  # Amex 4-6-5, Diners 4-6-4
        groups = [digits[:4], digits[4:10], digits[10:]]
    return sep.join(groups)


def credit_card(rng: random.Random) -> str:
    return format_card(rng, card_digits(rng))


def ssn(rng: random.Random) -> str:
    while True:
        value = f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if stdnum_ssn.is_valid(value):
            return value


_IBAN_FORMATS = {"DE": "8n10n", "GB": "4a14n", "FR": "10n11c2n", "NL": "4a10n", "ES": "20n", "IT": "1a10n12c", "CH": "5n12c"}


def _bban(rng: random.Random, layout: str) -> str:
    out = ""
    for count, cls in re.findall(r"(\d+)([anc])", layout):
        alphabet = {"a": string.ascii_uppercase, "n": string.digits, "c": string.ascii_uppercase + string.digits}[cls]
        out += "".join(rng.choice(alphabet) for _ in range(int(count)))
    return out


def _iban_check(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


def _group4(value: str) -> str:
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4))


def iban(rng: random.Random) -> str:
    country = rng.choice(sorted(_IBAN_FORMATS))
    while True:
        bban = _bban(rng, _IBAN_FORMATS[country])
        value = country + _iban_check(country, bban) + bban
        if stdnum_iban.is_valid(value):  # a few countries add national check digits
            return _group4(value) if rng.random() < 0.6 else value


def private_key_block(rng: random.Random) -> str:
    body = "\n".join(_alnum(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(4))
    label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


def secret(rng: random.Random) -> tuple[str, str]:
    """(text to place, the secret part that must vanish): token shapes and assignments."""
    shape = rng.randrange(7)
    if shape == 0:
        value = "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
        return value, value
    if shape == 1:
        value = "ghp_" + _alnum(rng, 36)
        return value, value
    if shape == 2:
        value = _alnum(rng, 32)
        return f'api_key = "{value}"', value
    if shape == 3:
        value = _alnum(rng, 12, string.ascii_letters + string.digits + "!#%&*")
        return f"password: '{value}'", value
    if shape == 4:
        value = _alnum(rng, 40, string.ascii_letters + string.digits + "/+")
        return f"AWS_SECRET_ACCESS_KEY={value}", value
    if shape == 5:
        value = _alnum(rng, 28)
        return f'{{"client_secret": "{value}"}}', value
    block = private_key_block(rng)
    return block, block.split("\n")[1]


# ---------------------------------------------------------------------------------- look-alikes


def _isbn13(rng: random.Random) -> str:
    body = rng.choice(["978", "979"]) + _digits(rng, 9)
    check = (10 - sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body)) % 10) % 10
    full = body + str(check)
    return rng.choice([f"{full[:3]}-{full[3]}-{full[4:6]}-{full[6:12]}-{full[12]}", full])


def _luhn_failing_card(rng: random.Random) -> str:
    digits = card_digits(rng)
    wrong = str((int(digits[-1]) + rng.randint(1, 9)) % 10)
    return format_card(rng, digits[:-1] + wrong)


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{d:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{d:02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"])


def _version(rng: random.Random) -> str:
    v = ".".join(str(rng.randint(0, 30)) for _ in range(4))
    return rng.choice([f"version {v}", f"v{v}", f"Version: {v}", f"release {v}", f"pkg=={v}", f"build {v}"])


def _hash(rng: random.Random) -> str:
    digest = rng.choice([hashlib.md5, hashlib.sha1, hashlib.sha256])(rng.randbytes(16)).hexdigest()
    return rng.choice([digest, f"sha256:{digest}", f"commit {digest[:12]}"])


def _private_ip(rng: random.Random) -> str:
    return rng.choice([
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "127.0.0.1", "::1", f"fe80::{rng.randint(1, 0xFFFF):x}", f"2001:db8::{rng.randint(1, 0xFFFF):x}",
    ])


def _unissued_ssn(rng: random.Random) -> str:
    return rng.choice([f"000-{_digits(rng, 2)}-{_digits(rng, 4)}", f"666-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                       f"9{_digits(rng, 2)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", f"{rng.randint(100, 665)}-00-{rng.randint(1000, 9999)}"])


def _bad_iban(rng: random.Random) -> str:
    country = rng.choice(sorted(_IBAN_FORMATS))
    bban = _bban(rng, _IBAN_FORMATS[country])
    good = int(_iban_check(country, bban))
    bad = f"{rng.choice([c for c in range(2, 99) if c != good]):02d}"
    return _group4(country + bad + bban)


def _code_mentioning_secrets(rng: random.Random) -> str:
    return rng.choice([
        'tokenizer = "bert-base-uncased"', "max_tokens = 4096", "password = get_password(user)",
        'api_key = os.environ["API_KEY"]', 'secret = "${APP_SECRET}"', "token: Optional[str] = None",
        'token_type = "access_token"', 'auth_url = "https://login.example.net/oauth"',
    ])


def _number_like(rng: random.Random) -> str:
    return rng.choice([
        f"{rng.randint(1, 99)}.{_digits(rng, 10)}", f"{rng.randint(1, 999)},{_digits(rng, 3)},{_digits(rng, 3)}",
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        ":".join(f"{rng.randint(0, 255):02x}" for _ in range(6)), f"${rng.randint(1, 999)},{_digits(rng, 3)}.{_digits(rng, 2)}",
    ])


PII_MAKERS: dict[str, Callable[[random.Random], str | tuple[str, str]]] = {
    "email": email, "phone": phone, "ip_address": public_ip, "credit_card": credit_card,
    "ssn": ssn, "iban": iban, "secret": secret,
}
LOOKALIKE_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "version": _version, "isbn": _isbn13, "date": _date, "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    "hash": _hash, "luhn_failing_digits": _luhn_failing_card, "private_ip": _private_ip, "unissued_ssn": _unissued_ssn,
    "bad_iban": _bad_iban, "code_mentioning_secrets": _code_mentioning_secrets, "number_like": _number_like,
}


def _paragraph(rng: random.Random, value: str, context: Sequence[str] | None) -> str:
    after = rng.choice(["", "", ",", ";", " -"])
    if context:  # a real sentence, cut at a word boundary around the value
        words = rng.choice(context).split()
        cut = rng.randint(1, len(words) - 1)
        return f"{' '.join(words[:cut])} {value}{after} {' '.join(words[cut:])}"
    filler = lambda n: " ".join(rng.choice(_WORDS) for _ in range(n))  # noqa: E731
    return f"{filler(rng.randint(3, 9)).capitalize()} {value}{after} {filler(rng.randint(3, 9))}."


def context_sentences(texts: Iterable[str], min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of ``texts`` fit to carry an item: letters and plain punctuation only (no digits,
    ``@``, ``:``, ``_`` or ``=``), so the carrier itself never holds anything a detector may match."""
    found = []
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            if _PLAIN_SENTENCE.fullmatch(sentence) and min_words <= len(sentence.split()) <= max_words:
                found.append(sentence)
    return found


def make_items(seed: int = 0, per_kind: int = 60, context: Sequence[str] | None = None) -> list[Item]:
    """``per_kind`` items of every PII kind and look-alike class, shuffled. Each sits in filler
    words, or, given ``context`` (sentences from ``context_sentences``), inside a real sentence."""
    rng = random.Random(seed)
    items = []
    for kind, make in PII_MAKERS.items():
        for _ in range(per_kind):
            made = make(rng)
            placed, hidden = made if isinstance(made, tuple) else (made, made)
            items.append(Item(kind, _paragraph(rng, placed, context), hidden, True))
    for kind, make in LOOKALIKE_MAKERS.items():
        for _ in range(per_kind):
            value = make(rng)
            items.append(Item(kind, _paragraph(rng, value, context), value, False))
    rng.shuffle(items)
    return items


def make_documents(items: list[Item], per_document: int = 5) -> list[str]:
    """Items grouped into documents, one paragraph each, so detectors also see neighbours."""
    return [PARAGRAPH.join(i.paragraph for i in items[n : n + per_document]) for n in range(0, len(items), per_document)]


def score(items: list[Item], redactor: Callable[[str], str], per_document: int = 5) -> MixScore:
    """Removed: the item's secret no longer appears. Altered: a look-alike's paragraph changed."""
    result = MixScore()
    for n, document in enumerate(make_documents(items, per_document)):
        group = items[n * per_document : (n + 1) * per_document]
        paragraphs = redactor(document).split(PARAGRAPH)
        if len(paragraphs) != len(group):
            raise ValueError(f"redactor merged or split paragraphs in document {n}")
        for item, out in zip(group, paragraphs):
            if item.is_pii:
                result.injected[item.kind] += 1
                result.removed[item.kind] += item.secret not in out
            else:
                result.lookalikes[item.kind] += 1
                result.altered[item.kind] += out != item.paragraph
    return result
