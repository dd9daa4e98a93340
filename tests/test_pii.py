"""The ``pii`` stage: every kind replaced, every look-alike kept, the acceptance rates, end to end."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.registry as registry
from tasks.config import validate_config
from tasks.data import pii
from tasks.data.pii_detect import PiiKind, RedactOptions, redact
from tasks.data.pii_mix import context_sentences, make_items, score
from tasks.stage import Stage

REPLACED = [
    # e-mail
    ("Write to jane.doe@example.com today.", "Write to <EMAIL> today."),
    ("Maintainer: Kofi Okafor <kofi+pypi@mail.uni-berlin.de>", "Maintainer: Kofi Okafor <<EMAIL>>"),
    # phones, US and international
    ("Call (415) 555-0132 after nine.", "Call <PHONE> after nine."),
    ("Office: 212-555-0188, cell 646.555.0199", "Office: <PHONE>, cell <PHONE>"),
    ("Toll free 1-800-555-0199.", "Toll free <PHONE>."),
    ("London +44 20 7946 0958 or Berlin +49 30 1234567.", "London <PHONE> or Berlin <PHONE>."),
    ("Tokyo +81 3-1234-5678, Mumbai +91 98765 43210", "Tokyo <PHONE>, Mumbai <PHONE>"),
    ("Phone: 4155550132", "Phone: <PHONE>"),
    # IPv4 and IPv6, public only
    ("Request from 81.2.69.160 at noon.", "Request from <IP_ADDRESS> at noon."),
    ("Peer 93.184.216.34:443 closed", "Peer <IP_ADDRESS>:443 closed"),
    ("Resolved to 2a00:1450:4001:81c::200e.", "Resolved to <IP_ADDRESS>."),
    ("Full form 2607:f8b0:4005:0805:0000:0000:0000:200e here", "Full form <IP_ADDRESS> here"),
    # credit cards: Luhn-valid, with spaces, dashes or none
    ("Visa 4111 1111 1111 1111 expires", "Visa <CREDIT_CARD> expires"),
    ("MC 5500-0000-0000-0004.", "MC <CREDIT_CARD>."),
    ("Amex 3782 822463 10005 on file", "Amex <CREDIT_CARD> on file"),
    ("card=6011111111111117", "card=<CREDIT_CARD>"),
    # SSNs with valid area, group and serial
    ("SSN 536-90-4399 on the form", "SSN <SSN> on the form"),
    ("ssn: 123 45 6789", "ssn: <SSN>"),
    # IBANs with valid mod-97 check digits
    ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN <IBAN>."),
    ("Pay to GB82WEST12345698765432 by Friday", "Pay to <IBAN> by Friday"),
    # secrets in text and code
    ("key AKIAIOSFODNN7EXAMPLE leaked", "key <SECRET> leaked"),
    ("export GITHUB_TOKEN=ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "export GITHUB_TOKEN=<SECRET>"),
    ("slack xoxb-1234567890-AbCdEfGhIjKl ok", "slack <SECRET> ok"),
    ("maps AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW ok", "maps <SECRET> ok"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc ok", "stripe <SECRET> ok"),
    (
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "Bearer <SECRET>",
    ),
    ('api_key = "sk3cr3tValue123"', 'api_key = "<SECRET>"'),
    ("{'password': 'hunter2!x9'}", "{'password': '<SECRET>'}"),
    ('{"client_secret": "Zq81mN0pLx72KkWvT"}', '{"client_secret": "<SECRET>"}'),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYz9Q2mKEY2", "AWS_SECRET_ACCESS_KEY=<SECRET>"),
    ("db_password: s3cretPassw0rd2024xyz", "db_password: <SECRET>"),
    (
        "before\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7v9\nQ2x8+/abc==\n-----END RSA PRIVATE KEY-----\nafter",
        "before\n<SECRET>\nafter",
    ),
]


@pytest.mark.parametrize(("text", "expected"), REPLACED, ids=[e for _, e in REPLACED])
def test_each_kind_is_replaced(text, expected):
    assert redact(text).text == expected


LOOKALIKES = {
    "version": [
        "version 1.2.3.4", "Released v2.10.3.1 today", "Version: 81.2.69.160", "pin numpy==1.26.4.1", "build 4.3.2.1",
        "Versions after 1.11.1.1 dropped it", "2.6.2.2 (2023-08-20)", "see section 8.2.4.44",
    ],
    "isbn": ["ISBN 978-3-16-148410-0", "978-0-306-40615-7", "ISBN-10 0-306-40615-2", "ISBN 9780306406157"],
    "date": ["on 2023-04-05", "05/04/2023", "04.05.2023", "2023-04-05T12:30:45Z", "April 5, 2023"],
    "uuid": ["id 123e4567-e89b-12d3-a456-426614174000", "f47ac10b-58cc-4372-a567-0e02b2c3d479"],
    "hash": [
        "md5 d41d8cd98f00b204e9800998ecf8427e",
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "commit 4155550132ab",
        "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    ],
    "luhn_failing_digits": ["4111 1111 1111 1112", "5500-0000-0000-0005", "1234567890123456", "3782 822463 10006"],
    "private_ip": [
        "10.0.0.1", "192.168.1.20", "172.16.5.4", "127.0.0.1", "::1", "fe80::1ff:fe23:4567:890a", "2001:db8::1",
        "netmask='ffff:ffff:ffff:ffff::'", "mask 255.255.255.0",
    ],
    "unissued_ssn": ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "078-05-1120"],
    "bad_iban": ["DE88 3704 0044 0532 0130 00", "GB83WEST12345698765432"],
    "numbers": ["pi is 3.14159265358979", "1,234,567,890 users", "2147483647 bytes", "range 32768-65535", "12:30:45"],
    "code": [
        'tokenizer = "bert-base-uncased"', "max_tokens = 4096", "password = get_password(user)",
        'api_key = os.environ["API_KEY"]', 'secret = "${APP_SECRET}"', 'password = "password"',
        'api_key="your-api-key"', "token: Optional[str] = None", "x = a[::2]", "std::vector<int>",
    ],
}


@pytest.mark.parametrize(
    "text", [t for group in LOOKALIKES.values() for t in group],
    ids=[f"{k}-{i}" for k, group in LOOKALIKES.items() for i in range(len(group))],
)
def test_lookalikes_survive(text):
    result = redact(text)
    assert result.text == text and result.total == 0


def test_counts_by_kind():
    text = "a@example.com b@example.org 81.2.69.160 4111 1111 1111 1111 SSN 536-90-4399 (415) 555-0132"
    assert redact(text).counts == {
        PiiKind.EMAIL: 2, PiiKind.IP_ADDRESS: 1, PiiKind.CREDIT_CARD: 1, PiiKind.SSN: 1, PiiKind.PHONE: 1,
    }


def test_private_ips_are_replaced_when_configured():
    text = "hosts 10.0.0.1, 192.168.1.20 and fe80::1ff:fe23:4567:890a"
    assert redact(text).text == text
    everything = RedactOptions(public_ips_only=False)
    assert redact(text, everything).text == "hosts <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>"


def test_only_the_configured_kinds_are_replaced():
    text = "mail a@example.com from 81.2.69.160"
    assert redact(text, RedactOptions(kinds=frozenset({PiiKind.EMAIL}))).text == "mail <EMAIL> from 81.2.69.160"


def test_national_numbers_follow_the_phone_region():
    assert redact("Ruf an: 030 1234567", RedactOptions(phone_region="DE")).text == "Ruf an: <PHONE>"
    assert redact("Ruf an: 030 1234567").text == "Ruf an: 030 1234567"  # not a US number


def test_generated_mix_meets_the_acceptance_rates():
    items = make_items(seed=20240501, per_kind=40)  # 280 injected PII items, 440 look-alikes
    result = score(items, lambda text: redact(text).text)
    assert sum(result.injected.values()) == 280 and sum(result.lookalikes.values()) == 440
    assert result.removed_share >= 0.99, result.table()
    assert result.altered_share <= 0.01, result.table()
    assert all(result.removed[k] >= 0.95 * result.injected[k] for k in result.injected), result.table()


def test_items_placed_in_real_sentences_keep_the_rates():
    """The mix with carrier sentences (as the benchmark's ``--corpus`` builds it): only plain
    sentences carry items, and detection does not lean on the filler words."""
    text = ("Call 555 0100 today. Write to me at home, please. The valley (old and quiet) is a good place to live. "
            "Set key=value here now. Short one. Une vallée tranquille où les fermiers vivent depuis longtemps.")
    context = context_sentences([text, "Ein ruhiges Tal, in dem die Bauern seit langer Zeit leben!"])
    assert context == ["Write to me at home, please.", "The valley (old and quiet) is a good place to live.",
                       "Une vallée tranquille où les fermiers vivent depuis longtemps.",
                       "Ein ruhiges Tal, in dem die Bauern seit langer Zeit leben!"]
    items = make_items(seed=7, per_kind=20, context=context)
    assert all(any(item.paragraph.startswith(c.split()[0]) for c in context) for item in items)
    result = score(items, lambda text: redact(text).text)
    assert result.removed_share >= 0.99 and result.altered_share <= 0.01, result.table()


def test_config_is_checked():
    assert pii.PiiConfig(kinds=["email", "email", "ssn"]).kinds == [PiiKind.EMAIL, PiiKind.SSN]
    for bad in ({"phone_region": "XX"}, {"kinds": ["passport"]}, {"kinds": []}, {"max_hits": -1}, {"colour": 1}):
        with pytest.raises(ValueError):
            pii.PiiConfig(**bad)


# ---------------------------------------------------------------------------------- end to end

DOCS = [
    {"id": "clean", "text": "Nothing to see here, version 1.2.3.4 only."},
    {"id": "mail", "text": "Contact anna.smith@example.com for details."},
    {"id": "mixed", "text": "Call +44 20 7946 0958 or mail li@example.org from 81.2.69.160."},
    {"id": "dump", "text": "a@example.com b@example.com c@example.com, card 4111 1111 1111 1111"},
    {"id": "code", "text": 'API_KEY = "Zq81mN0pLx72KkWvT"\nhost = "10.0.0.1"\n'},
]


@pytest.fixture
def pii_after_ingest(monkeypatch):
    """``pii`` run straight after ``ingest``, so the stage is tested without filter and dedup."""
    real = registry.STAGES.get("pii", pii.STAGE)
    monkeypatch.setitem(registry.STAGES, "pii", Stage("pii", ("ingest",), real.version, real.run))


def _config(tmp_path, **section):
    source = tmp_path / "web.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return validate_config({
        "name": "pii-e2e",
        "store": str(tmp_path / "store"),
        "ingest": {"sources": [{"name": "web", "path": str(source), "domain": "web", "id_field": "id"}]},
        "pii": {"batch_size": 2, **section},
    }, "test")


def _read(paths: list[str]) -> dict[str, dict]:
    rows = pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist() if paths else []
    return {row["id"]: row for row in rows}


def test_stage_redacts_counts_rejects_and_resumes(tmp_path, tmp_home, ray_session, pii_after_ingest):
    from tasks.engine import plan, run_pipeline, run_stage
    from tasks.trace import trace_document

    config = _config(tmp_path, max_hits=3)
    outcomes = run_pipeline(config)
    manifest = outcomes[-1].manifest
    kept, rejected = _read(manifest.file_paths("documents")), _read(manifest.file_paths("rejected"))

    assert set(kept) == {"web/clean", "web/mail", "web/mixed", "web/code"} and set(rejected) == {"web/dump"}
    assert kept["web/clean"]["text"] == DOCS[0]["text"]
    assert kept["web/mixed"]["text"] == "Call <PHONE> or mail <EMAIL> from <IP_ADDRESS>."
    assert kept["web/code"]["text"] == 'API_KEY = "<SECRET>"\nhost = "10.0.0.1"\n'
    assert (kept["web/mixed"]["pii_phone"], kept["web/mixed"]["pii_email"], kept["web/mixed"]["pii_ip_address"]) == (1, 1, 1)
    assert {k: v for k, v in kept["web/mail"].items() if k.startswith("pii_")} == {
        "pii_email": 1, "pii_phone": 0, "pii_ip_address": 0, "pii_credit_card": 0, "pii_ssn": 0, "pii_iban": 0, "pii_secret": 0,
    }
    dump = rejected["web/dump"]
    assert dump["reason"] == pii.REJECT_REASON and (dump["pii_email"], dump["pii_credit_card"]) == (3, 1)
    assert "@" not in dump["text"]  # the audit trail holds no PII either
    assert kept["web/mail"]["source"] == "web" and kept["web/mail"]["domain"] == "web"
    traced = {d: trace_document(config, "test", d).stages[-1] for d in ("web/dump", "web/mixed", "web/clean")}  # pii's id index
    assert (traced["web/dump"].status, traced["web/dump"].reason) == ("removed", pii.REJECT_REASON)
    assert traced["web/dump"].replaced == {"email": 3, "credit_card": 1}
    assert traced["web/mixed"].replaced == {"phone": 1, "email": 1, "ip_address": 1} and traced["web/mixed"].status == "kept"
    assert (traced["web/clean"].status, traced["web/clean"].replaced) == ("kept", {})

    assert manifest.rows == 4
    assert manifest.counts["rows_in"] == 5 and manifest.counts["removed.pii_excess"] == 1
    assert manifest.counts["documents_changed"] == 4
    assert manifest.counts["pii.email"] == 5 and manifest.counts["pii.secret"] == 1 and manifest.counts["pii_hits"] == 9
    assert manifest.metrics["changed_rate"] == pytest.approx(0.8)
    assert "| email | `<EMAIL>` | 5 | 3 |" in outcomes[-1].report

    # An interrupted attempt: no manifest, and a shard from a differently batched earlier try.
    out = plan(config)["pii"].out
    out.fs.delete_file(out.path("manifest.json"))
    pq.write_table(pq.read_table(manifest.file_paths("documents")[0]), out.path("documents/part-0000000000000000.parquet"))
    finished = {p: out.fs.get_file_info(p).mtime_ns for p in manifest.file_paths("documents")}
    again = run_stage(config, "pii").manifest
    shards = len(manifest.file_paths("documents"))
    assert (manifest.counts["reused_shards"], manifest.counts["stale_shards_removed"]) == (0, 0)
    assert (again.counts["reused_shards"], again.counts["stale_shards_removed"]) == (shards, 1)
    same = {k: v for k, v in manifest.counts.items() if "shards" not in k}
    assert again.files == manifest.files and {k: again.counts[k] for k in same} == same
    assert {p: out.fs.get_file_info(p).mtime_ns for p in again.file_paths("documents")} == finished  # reused
    assert len(_read(again.file_paths("documents"))) == 4
