"""PII detection on identifiers written by hand, the way people write them in mail, forms and logs.

Every positive here was typed out in an ordinary format, not produced by phonenumbers,
python-stdnum or faker (the libraries the detector validates its hits with), so a blind spot
the detector shares with them shows up here. Card numbers are the networks' published test
numbers (Luhn-valid), IBANs the examples from the IBAN registry, phones the fictional ranges
(US 555-01xx, UK 020 7946 0xxx) or well-known switchboards. Each positive sits in
a sentence next to look-alikes (versions, ISBNs, dates, UUIDs, hashes, bad check digits …) that
must come through untouched.
"""

from __future__ import annotations

import pytest

from tasks.data.pii_detect import PiiKind, RedactOptions, redact

# (text, region, expected): the region is the phone region of the stage config (national numbers).
POSITIVES: list[tuple[str, str, str]] = [
    # e-mail: plus-addressing, subdomains, capitals, in brackets, before punctuation, after mailto:
    ("Sign up as first.last+newsletter@mail.example.co.uk please", "US", "Sign up as <EMAIL> please"),
    ("Contact: j_smith@dept.physics.uni-heidelberg.de.", "US", "Contact: <EMAIL>."),
    ("CC ops-team@alerts.eu-west.example.io, thanks", "US", "CC <EMAIL>, thanks"),
    ("From: John.Doe@Example.COM", "US", "From: <EMAIL>"),
    ("<a href=\"mailto:help@support.example.org\">help</a>", "US", "<a href=\"mailto:<EMAIL>\">help</a>"),
    ("(maria.garcia.1987@correo.example.es)", "US", "(<EMAIL>)"),
    ("reply to x+y+z@sub1.sub2.example.net!", "US", "reply to <EMAIL>!"),
    # US phones, every common separator
    ("Call (212) 555-0147 tomorrow.", "US", "Call <PHONE> tomorrow."),
    ("Fax: 212.555.0147", "US", "Fax: <PHONE>"),
    ("Reach me at +1 212 555 0147.", "US", "Reach me at <PHONE>."),
    ("Phone +1-212-555-0147 (cell)", "US", "Phone <PHONE> (cell)"),
    ("Dial 1 (800) 555-0199 for help", "US", "Dial <PHONE> for help"),
    ("Tel. 212/555-0147", "US", "Tel. <PHONE>"),
    # UK
    ("Our London office: +44 20 7946 0958.", "US", "Our London office: <PHONE>."),
    ("Mobile +44 7911 123456", "US", "Mobile <PHONE>"),
    ("Call +44 (0)20 7946 0958 today", "US", "Call <PHONE> today"),
    ("Ring 020 7946 0958 after 5pm", "GB", "Ring <PHONE> after 5pm"),
    ("Mobile: 07911 123456", "GB", "Mobile: <PHONE>"),
    # Germany
    ("Rufen Sie +49 30 12345678 an.", "US", "Rufen Sie <PHONE> an."),
    ("Tel.: +49 (0)89 12345678", "US", "Tel.: <PHONE>"),
    ("Mobil +49-170-1234567", "US", "Mobil <PHONE>"),
    ("Telefon 030 12345678", "DE", "Telefon <PHONE>"),
    ("Telefon 0049 30 12345678", "DE", "Telefon <PHONE>"),
    # France
    ("Appelez le +33 1 42 68 53 00.", "US", "Appelez le <PHONE>."),
    ("Portable : +33 6 12 34 56 78", "US", "Portable : <PHONE>"),
    ("Tél : 01 42 68 53 00", "FR", "Tél : <PHONE>"),
    ("Tél. 01.42.68.53.00", "FR", "Tél. <PHONE>"),
    # elsewhere, with the +country form
    ("Sydney +61 2 9374 4000; Dublin +353 1 234 5678", "US", "Sydney <PHONE>; Dublin <PHONE>"),
    ("Madrid +34 912 345 678", "US", "Madrid <PHONE>"),
    # SSNs
    ("SSN: 401-23-4567", "US", "SSN: <SSN>"),
    ("social security no. 772 10 5432 on file", "US", "social security no. <SSN> on file"),
    # IBANs (registry examples): grouped, run together, with letters in the account
    ("IBAN: FR14 2004 1010 0505 0001 3M02 606", "US", "IBAN: <IBAN>"),
    ("to NL91ABNA0417164300, ref 2024/17", "US", "to <IBAN>, ref 2024/17"),
    ("Konto ES91 2100 0418 4502 0005 1332.", "US", "Konto <IBAN>."),
    ("IT60 X054 2811 1010 0000 0123 456 (conto)", "US", "<IBAN> (conto)"),
    ("CH93 0076 2011 6238 5295 7 / BE68 5390 0754 7034", "US", "<IBAN> / <IBAN>"),
    ("PL61 1090 1014 0000 0712 1981 2874", "US", "<IBAN>"),
    # credit cards, Luhn-valid, several networks and layouts
    ("Visa 4242 4242 4242 4242 exp 12/27", "US", "Visa <CREDIT_CARD> exp 12/27"),
    ("card no 4242-4242-4242-4242", "US", "card no <CREDIT_CARD>"),
    ("paid with 5555555555554444.", "US", "paid with <CREDIT_CARD>."),
    ("Mastercard 2223 0031 2200 3222", "US", "Mastercard <CREDIT_CARD>"),
    ("Amex 3714 496353 98431", "US", "Amex <CREDIT_CARD>"),
    ("Discover 6011 0009 9013 9424, JCB 3530 1113 3330 0000", "US", "Discover <CREDIT_CARD>, JCB <CREDIT_CARD>"),
    ("Diners 3056 930902 5904", "US", "Diners <CREDIT_CARD>"),
    # IP addresses (public)
    ("client 66.249.66.1 - - [10/Oct/2023:13:55:36 +0000] \"GET / HTTP/1.1\"", "US",
     "client <IP_ADDRESS> - - [10/Oct/2023:13:55:36 +0000] \"GET / HTTP/1.1\""),
    ("connect to 151.101.1.69:8080 failed", "US", "connect to <IP_ADDRESS>:8080 failed"),
    ("ssh admin@185.199.108.153", "US", "ssh admin@<IP_ADDRESS>"),
    ("AAAA 2606:4700:4700::1111 and 2a03:2880:f12f:83:face:b00c:0:25de", "US", "AAAA <IP_ADDRESS> and <IP_ADDRESS>"),
]


@pytest.mark.parametrize(("text", "region", "expected"), POSITIVES, ids=[e for _, _, e in POSITIVES])
def test_handwritten_identifiers_are_replaced(text, region, expected):
    assert redact(text, RedactOptions(phone_region=region)).text == expected


LOOKALIKES = [
    # versions and build numbers
    "Python 3.12.1 and numpy 1.26.4", "upgrade to v10.2.0.45", "Chrome/118.0.5993.88 Safari/537.36",
    "release 1.2.3-beta.4", "glibc 2.31.4.7", "kernel 5.15.0-91-generic",
    # ISBNs, ISSNs, DOIs
    "ISBN 978-0-262-03384-8", "ISBN-10: 0-262-03384-4", "ISBN: 9780262033848", "ISSN 0028-0836",
    "doi:10.1038/nature14539",
    # dates, times, timestamps
    "2024-03-15", "15.03.2024", "03/15/2024", "15/03/2024 14:22", "2024-03-15T14:22:05+01:00", "at 14:30:00",
    "unix time 1710505320",
    # identifiers and digests
    "request 550e8400-e29b-41d4-a716-446655440000 done", "commit a1b2c3d", "sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",
    "etag \"33a64df551425fcc55e4d42a148795d9f25f89d4\"", "MAC 00:1A:2B:3C:4D:5E",
    # numbers shaped like the real things but failing their checks
    "card 4242 4242 4242 4241", "6011 0009 9013 9425", "FR14 2004 1010 0505 0001 3M02 607", "SSN 987-65-4321",
    "000-00-0000",
    # quantities, prices, codes
    "ZIP 90210-1234", "$1,299.99", "population 8,045,311,447", "2^31 - 1 = 2147483647", "48.8584, 2.2945",
    "INV-2024-000123", "UPS 1Z999AA10123456784", "lat/lon 40.7128,-74.0060",
    # file names and handles that contain an @
    "logo@2x.png", "icon@3x.jpg", "npm i lodash@4.17.21", "@babel/core",
    # documentation and private addresses stay (public_ips_only)
    "203.0.113.7", "192.0.2.44", "10.1.2.3", "2001:db8:85a3::8a2e:370:7334",
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_handwritten_lookalikes_are_left_alone(text):
    for region in ("US", "GB", "DE", "FR"):
        result = redact(text, RedactOptions(phone_region=region))
        assert result.text == text and result.total == 0, region


def test_a_handwritten_paragraph_counts_each_kind():
    text = (
        "Hi, I'm Anna (anna.k+work@mail.example.de, +49 30 12345678). Please wire the deposit to "
        "DE89 3704 0044 0532 0130 00 or charge 4242 4242 4242 4242; my SSN is 401-23-4567 and I "
        "last logged in from 66.249.66.1. Ref: ISBN 978-0-262-03384-8, build 2.31.4.7, 2024-03-15."
    )
    result = redact(text)
    assert result.text == (
        "Hi, I'm Anna (<EMAIL>, <PHONE>). Please wire the deposit to "
        "<IBAN> or charge <CREDIT_CARD>; my SSN is <SSN> and I "
        "last logged in from <IP_ADDRESS>. Ref: ISBN 978-0-262-03384-8, build 2.31.4.7, 2024-03-15."
    )
    assert result.counts == {
        PiiKind.EMAIL: 1, PiiKind.PHONE: 1, PiiKind.IBAN: 1, PiiKind.CREDIT_CARD: 1, PiiKind.SSN: 1, PiiKind.IP_ADDRESS: 1,
    }
