"""Find structured PII in text and replace it with typed placeholders (``<EMAIL>``, ``<PHONE>`` …).

Pure functions, no Ray: the ``pii`` stage maps :func:`redact` over document batches, and the
tests and the benchmark call it directly.

Every detector pairs a cheap pattern with a validator, because precision matters as much as
recall here: a language model trained on text whose version numbers, ISBNs, dates, UUIDs and
hashes were turned into ``<PHONE>`` learns the wrong thing. So card numbers must pass Luhn and
start like a card, SSNs must obey the area/group/serial rules, IBANs must pass mod-97 and their
country's format (``python-stdnum``), phone numbers must be valid for their country
(``phonenumbers``, Google's libphonenumber), IP addresses must parse and be public
(``ipaddress``), and numbers written right after "version", "ISBN", ``==`` and the like are
left alone.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.exceptions import InvalidComponent, ValidationError
from stdnum.us import ssn as stdnum_ssn


class PiiKind(str, Enum):
    """The kinds of PII the stage removes; the value names the per-document count column."""

    EMAIL = "email"
    PHONE = "phone"
    IP_ADDRESS = "ip_address"
    CREDIT_CARD = "credit_card"
    SSN = "ssn"
    IBAN = "iban"
    SECRET = "secret"

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"


ALL_KINDS: tuple[PiiKind, ...] = tuple(PiiKind)


@dataclass(frozen=True)
class Hit:
    """One detected item: ``text[start:end]`` is replaced by ``kind``'s placeholder."""

    start: int
    end: int
    kind: PiiKind


@dataclass(frozen=True)
class Redaction:
    text: str
    counts: Counter[PiiKind]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------- look-alike guards

# A number right after one of these is a version, a section, an ISBN or a package pin, not PII.
_NOT_PII_BEFORE = re.compile(
    r"(?ix)(?:\b(?:v|ver|versions?|releases?|rel|build|revision|rev|firmware|fw|kernel|section|sec|§|isbn(?:-1[03])?|issn|doi)"
    r"\s*[:#=]?\s*|(?:[=<>!~]=|[\^~@])\s*)$"
)
_LOOKBACK = 24


def _after_non_pii_marker(text: str, start: int) -> bool:
    return _NOT_PII_BEFORE.search(text, max(0, start - _LOOKBACK), start) is not None


def _is_number_not_phone(text: str, start: int, end: int) -> bool:
    """A decimal (``11.9375709396``), or part of a longer number or token (``3.14159265358``, ``aix-6107-1415``)."""
    before = text[max(0, start - 2) : start]
    after = text[end : end + 2]
    return bool(
        re.fullmatch(r"\+?\d+[.,]\d+", text[start:end])
        or re.fullmatch(r"\d[.,]|\w-", before)
        or re.fullmatch(r"[.,]\d|-\w", after)
    )


# Structured tokens that are not PII but contain PII-shaped digit runs: UUIDs, hex digests and
# IBAN-shaped strings (valid or not). A hit inside one of them is dropped; a hit covering one
# whole (a valid IBAN) stays.
_NOT_PII_SHAPES = re.compile(
    r"(?<![\w-])(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32,128}"
    r"|[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)(?![\w-])"
)


def _inside_not_pii_shape(hit: Hit, shapes: list[tuple[int, int]]) -> bool:
    """True when ``hit`` overlaps a non-PII shape without covering it whole (shapes: sorted, disjoint)."""
    i = bisect.bisect_left(shapes, hit.end, key=lambda span: span[0])
    while i > 0 and shapes[i - 1][1] > hit.start:
        i -= 1
        start, end = shapes[i]
        if not (hit.start <= start and end <= hit.end):
            return True
    return False


# --------------------------------------------------------------------------- detectors

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)


# Image file extensions, none of them a top-level domain: ``logo@2x.png`` is a retina asset.
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff", "avif", "heic"})


def find_emails(text: str) -> Iterator[Hit]:
    for m in _EMAIL.finditer(text):
        if m.group().rsplit(".", 1)[1].lower() not in _FILE_SUFFIXES:
            yield Hit(m.start(), m.end(), PiiKind.EMAIL)


# Stretches with at least seven digits: libphonenumber's matcher only runs around these, which
# keeps the stage fast on code and tables of numbers.
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d(?:[ ().\-/]{0,3}\d){6,}")
_PHONE_CONTEXT = re.compile(r"(?i)\b(?:tel|telephone|phone|mobile|mob|cell|fax|call|whatsapp|sms)\b")
_WINDOW_MARGIN = 16


def _phone_windows(text: str) -> Iterator[tuple[int, int]]:
    """Merged text windows around phone-like digit stretches, with context for the matcher."""
    window: tuple[int, int] | None = None
    for m in _PHONE_CANDIDATE.finditer(text):
        start, end = max(0, m.start() - _WINDOW_MARGIN), min(len(text), m.end() + _WINDOW_MARGIN)
        if window and start <= window[1]:
            window = (window[0], end)
            continue
        if window:
            yield window
        window = (start, end)
    if window:
        yield window


def find_phones(text: str, region: str = "US") -> Iterator[Hit]:
    """Numbers libphonenumber holds valid: any ``+country`` number, national ones of ``region``.

    A ``+country`` number only has to be valid; a national one must also be grouped the way
    its country writes numbers (``32768-65535`` is a range, not a phone), and a bare run of
    digits (``4155550132``) counts only after a word like "phone" or "call": in code and data
    such runs are ids, sizes and timestamps far more often than phones.
    """
    for lo, hi in _phone_windows(text):
        window = text[lo:hi]
        grouped = None
        for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID):
            start, end = lo + m.start, lo + m.end
            if _is_number_not_phone(text, start, end) or _after_non_pii_marker(text, start):
                continue
            if re.fullmatch(r"\(?\d+\)?", m.raw_string) and not _PHONE_CONTEXT.search(text, max(0, start - _LOOKBACK), start):
                continue
            if not m.raw_string.startswith("+"):
                if grouped is None:
                    strict = phonenumbers.Leniency.STRICT_GROUPING
                    grouped = {(g.start, g.end) for g in phonenumbers.PhoneNumberMatcher(window, region, leniency=strict)}
                if (m.start, m.end) not in grouped:
                    continue
            yield Hit(start, end, PiiKind.PHONE)


_IPV4 = re.compile(r"(?<![\w.-])\d{1,3}(?:\.\d{1,3}){3}(?![\w-]|\.\w)")  # ipaddress checks the octets
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)


def _ip_kept(address: str, public_only: bool) -> bool:
    """True when ``address`` is not an IP to remove: not an address, a netmask, a dotted version
    number, or (when only public ones go) private, loopback, multicast or reserved.

    A public-range IPv4 whose four components are all below 32 (``1.11.1.1``, ``8.2.4.44``) is
    far more often a version or a section number than a host: random public addresses look
    like that once in 4,000, and the famous ones (``8.8.8.8``, ``1.1.1.1``) are public
    resolvers, not anyone's data.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if ip.version == 4 and ip.is_global and all(int(part) < 32 for part in address.split(".")):
        return True
    ones = ~int(ip) & (2**ip.max_prefixlen - 1)
    if ones & (ones + 1) == 0:  # ones then zeros: a netmask (``ffff:ffff::``, ``255.255.255.0``)
        return True
    return public_only and not (ip.is_global and not ip.is_multicast)


def find_ips(text: str, public_only: bool = True) -> Iterator[Hit]:
    """IPv4 and IPv6 addresses; by default only public ones (private, loopback, reserved stay)."""
    for m in _IPV4.finditer(text):
        user_at_host = re.search(r"\w@$", text[max(0, m.start() - 2) : m.start()]) is not None  # ``ssh root@…``
        if not _ip_kept(m.group(), public_only) and (user_at_host or not _after_non_pii_marker(text, m.start())):
            yield Hit(m.start(), m.end(), PiiKind.IP_ADDRESS)
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):  # fewer than three groups: a slice or a prefix (``[::2]``, ``C000::``)
            groups = [g for g in m.group().split(":") if g]
            if (len(groups) >= 3 or "." in m.group()) and not _ip_kept(m.group(), public_only):
                yield Hit(m.start(), m.end(), PiiKind.IP_ADDRESS)


# Printed card layouts: 4-4-4-4(-3), Amex 4-6-5, Diners 4-6-4, or 13-19 digits in one run; never a
# stretch of a longer run of digit groups.
_CARD = re.compile(
    r"(?<![\w.,+-])(?<!\d\d\d\d[ -])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{4,5})"
    r"(?![\w-]|[.,]\d|[ -]\d{3})"
)
# Issuer prefixes of the card networks (Visa, Mastercard, Amex, Diners, Discover, JCB, UnionPay,
# Maestro); an ISBN-13 (978/979…) or a long id that happens to pass Luhn starts otherwise.
_CARD_PREFIX = re.compile(r"4|5|6|3[0456789]|222[1-9]|22[3-9]|2[3-6]|27[01]|2720")


def is_card_number(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None and luhn.is_valid(digits)


def find_credit_cards(text: str) -> Iterator[Hit]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if is_card_number(digits) and not _after_non_pii_marker(text, m.start()):
            yield Hit(m.start(), m.end(), PiiKind.CREDIT_CARD)


_SSN = re.compile(r"(?<![\w.,+-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-]|[.,]\d)")


def find_ssns(text: str) -> Iterator[Hit]:
    """``AAA-GG-SSSS`` (or space-separated) with a valid area, group and serial."""
    for m in _SSN.finditer(text):
        if stdnum_ssn.is_valid(f"{m.group(1)}-{m.group(3)}-{m.group(4)}"):
            yield Hit(m.start(), m.end(), PiiKind.SSN)


_IBAN = re.compile(r"(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w-])")


def is_iban(candidate: str) -> bool:
    """Mod-97 check digits, the country's BBAN layout and its national check digits.

    A bank that python-stdnum's registry does not list (``BE68 5390 0754 7034``, the IBAN
    registry's own Belgian example) still counts: the registry lags the banks, and an unknown
    bank code says nothing about whether the number is someone's account.
    """
    try:
        stdnum_iban.validate(candidate, check_country=False)
    except ValidationError:
        return False
    try:
        stdnum_iban.validate(candidate)
    except InvalidComponent:
        return True
    except ValidationError:
        return False
    return True


def find_ibans(text: str) -> Iterator[Hit]:
    """IBANs valid for their country's format and the mod-97 check digits."""
    for m in _IBAN.finditer(text):
        if is_iban(m.group()):
            yield Hit(m.start(), m.end(), PiiKind.IBAN)


_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?=\n[ \t]*\n)|\Z)"
)
# Credentials whose shape alone gives them away.
_TOKEN = re.compile(
    r"(?<![\w-])(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|[sr]k_live_[0-9A-Za-z]{16,}"  # Stripe live keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON Web Token
    r")(?![\w-])"
)
# ``api_key = "…"``, ``"password": "…"``, ``SECRET_TOKEN=…``: the name stays, the value goes.
# Found in two steps because one regex led by the credential words is slow on code: first an
# operator with a credential-shaped value, then a credential word right before the operator.
# The name must *end* in a credential word, so ``tokenizer = "…"`` or ``max_tokens = 512`` stay.
_ASSIGNED_VALUE = re.compile(
    r"""(?P<op>:=|=>|=|:)(?P<gap>\s*)"""
    r"""(?:(?P<q>["'`])(?P<quoted>[^"'`\s]{8,512})(?P=q)|(?P<bare>[A-Za-z0-9_+/=-]{16,512})(?![\w.(\[]))"""
)
_CREDENTIAL_NAME = re.compile(
    r"""(?i)(?:(?:api|app|secret|access|private|auth|encryption|signing|master|client)[_-]?key|apikey"""
    r"""|client[_-]?secret|secret|token|passw(?:or)?d|pwd|credentials?)["']?\s*$"""
)
_NAME_WINDOW = 48
# Values that stand for a secret rather than being one: templates, env references, masks,
# documentation stand-ins (``your-api-key``, ``changeme``).
_PLACEHOLDER_VALUE = re.compile(
    r"(?i)^(?:<.*>|\$\{?\w+\}?|\{\{.*\}\}|%\(\w+\)s|(.)\1*"
    r"|.*(?:your|example|placeholder|changeme|change_me|dummy|redacted|xxxx).*)$"
)


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _assigned_secrets(text: str) -> Iterator[Hit]:
    for m in _ASSIGNED_VALUE.finditer(text):
        name = _CREDENTIAL_NAME.search(text, max(0, m.start() - _NAME_WINDOW), m.start())
        if name is None:
            continue
        group = "quoted" if m.group("quoted") is not None else "bare"
        value = m.group(group)
        if _PLACEHOLDER_VALUE.match(value) or (re.fullmatch(r"[A-Za-z_-]+", value) and _letters(name.group()) in _letters(value)):
            continue  # ``password = "password"``, ``owner_secret = "owner_secret"``, ``api_key = "<your key>"``
        if group == "bare" and (
            not (re.search(r"\d", value) and re.search(r"[A-Za-z]", value))  # ``password = get_password``
            or (m.group("op") == ":" and not m.group("gap"))  # ``scheme://Token:Path/…`` templates
        ):
            continue
        yield Hit(m.start(group), m.end(group), PiiKind.SECRET)


def find_secrets(text: str) -> Iterator[Hit]:
    for m in _PRIVATE_KEY.finditer(text):
        yield Hit(m.start(), m.end(), PiiKind.SECRET)
    for m in _TOKEN.finditer(text):
        yield Hit(m.start(), m.end(), PiiKind.SECRET)
    yield from _assigned_secrets(text)


# --------------------------------------------------------------------------- redaction


@dataclass(frozen=True)
class RedactOptions:
    """What to look for; mirrors the stage's config section."""

    kinds: frozenset[PiiKind] = frozenset(ALL_KINDS)
    public_ips_only: bool = True
    phone_region: str = "US"


def find_all(text: str, options: RedactOptions = RedactOptions()) -> list[Hit]:
    """All non-overlapping hits, longest first: an IBAN wins over the digits inside it."""
    detectors: dict[PiiKind, Callable[[str], Iterable[Hit]]] = {
        PiiKind.SECRET: find_secrets,
        PiiKind.EMAIL: find_emails,
        PiiKind.IBAN: find_ibans,
        PiiKind.CREDIT_CARD: find_credit_cards,
        PiiKind.SSN: find_ssns,
        PiiKind.IP_ADDRESS: lambda t: find_ips(t, options.public_ips_only),
        PiiKind.PHONE: lambda t: find_phones(t, options.phone_region),
    }
    rank = {kind: i for i, kind in enumerate(detectors)}
    shapes = [m.span() for m in _NOT_PII_SHAPES.finditer(text)]
    candidates = [
        hit
        for kind, find in detectors.items()
        if kind in options.kinds
        for hit in find(text)
        if not _inside_not_pii_shape(hit, shapes)
    ]
    candidates.sort(key=lambda h: (h.start - h.end, rank[h.kind], h.start))
    taken: list[Hit] = []  # disjoint, sorted by start
    for hit in candidates:
        i = bisect.bisect_left(taken, hit.start, key=lambda h: h.start)
        if (i == 0 or taken[i - 1].end <= hit.start) and (i == len(taken) or hit.end <= taken[i].start):
            taken.insert(i, hit)
    return taken


def redact(text: str, options: RedactOptions = RedactOptions()) -> Redaction:
    """Replace every hit with its kind's placeholder; count hits by kind."""
    hits = find_all(text, options)
    parts, pos = [], 0
    for hit in hits:
        parts.append(text[pos : hit.start])
        parts.append(hit.kind.placeholder)
        pos = hit.end
    parts.append(text[pos:])
    return Redaction("".join(parts), Counter(hit.kind for hit in hits))
