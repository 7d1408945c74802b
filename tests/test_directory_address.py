"""Address grammar: canonical form, limits at their edges, relay hacks, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intermail.directory.address import (
    MAX_DOMAIN, MAX_LOCAL, MAX_PATH, Address, format_address, is_bang_path, is_percent_hack,
    is_relay_hack, is_source_route, parse, parse_domain, parse_path)
from intermail.errors import ErrorKind, MailError


def invalid(text: str) -> MailError:
    with pytest.raises(MailError) as info:
        parse(text)
    assert info.value.kind is ErrorKind.INVALID
    return info.value


@pytest.mark.parametrize("text, local, domain", [
    ("alice@example.com", "alice", "example.com"),
    ("Alice@Example.COM", "alice", "example.com"),
    ("first.last+tag@sub.example.org", "first.last+tag", "sub.example.org"),
    ("!#$%&'*+-/=?^_`{|}~@x", "!#$%&'*+-/=?^_`{|}~", "x"),
    ('"Alice"@x.org', "alice", "x.org"),  # needless quoting changes nothing
    ('"John Smith"@x.org', "John Smith", "x.org"),  # quoted: verbatim, case kept
    ('"a\\"b\\\\c"@x.org', 'a"b\\c', "x.org"),
    ('"a\\b"@x.org', "ab", "x.org"),  # quoted-pair of an ordinary char
    ('"a@b"@x.org', "a@b", "x.org"),
    ('"a..b"@x.org', "a..b", "x.org"),
    ("a@bücher.example", "a", "xn--bcher-kva.example"),
    ("a@BÜCHER.example", "a", "xn--bcher-kva.example"),
    ("a@xn--bcher-kva.example", "a", "xn--bcher-kva.example"),
    ("a@[192.0.2.1]", "a", "[192.0.2.1]"),
    ("a@[IPv6:2001:DB8:0::1]", "a", "[IPv6:2001:db8::1]"),
    ("a@[ipv6:::1]", "a", "[IPv6:::1]"),
    ("postmaster@localhost", "postmaster", "localhost"),
])
def test_parse_canonical(text, local, domain):
    address = parse(text)
    assert address == Address(local, domain)
    assert parse(str(address)) == address


def test_case_rule_dot_atom_folded_quoted_kept():
    assert parse("Alice@x.org") == parse("alice@X.ORG")
    assert parse('"John Smith"@x.org') != parse('"john smith"@x.org')


def test_format_quotes_only_when_needed():
    assert str(parse('"John Smith"@x.org')) == '"John Smith"@x.org'
    assert str(parse('"a\\"b"@x')) == '"a\\"b"@x'
    assert format_address(parse('"Abc"@x')) == "abc@x"
    assert parse('"John Smith"@x.org').quoted and not parse("a@x").quoted


@pytest.mark.parametrize("text, safe", [
    ("", "empty address"),
    ("alice", "address has no @domain"),
    ("@x.org", "empty local part"),
    ('""@x.org', "empty local part"),
    ("alice@", "empty domain"),
    ("alice@x.org.", "domain must not end with a dot"),
    ("a..b@x.org", "invalid character in local part"),
    (".a@x.org", "invalid character in local part"),
    ("a.@x.org", "invalid character in local part"),
    ("a b@x.org", "invalid character in local part"),
    ("a(b)@x.org", "invalid character in local part"),
    ("jörg@x.org", "non-ASCII local part not supported"),
    ('"abc@x.org', "malformed quoted local part"),
    ('"a"b@x.org', "address has no @domain"),
    ("a@x..org", "empty label in domain"),
    ("a@-x.org", "invalid character in domain"),
    ("a@x-.org", "invalid character in domain"),
    ("a@x_y.org", "invalid character in domain"),
    ("a@xn--zz.org", "invalid international domain name"),
    ("a@[192.0.2.300]", "malformed address literal"),
    ("a@[192.0.2.1", "malformed address literal"),
    ("a@[x-tag:stuff]", "unsupported address literal"),
    ("a@[IPv6:1.2.3.4]", "malformed address literal"),
])
def test_parse_refuses(text, safe):
    assert invalid(text).safe == safe


def test_limit_local_part_edge():
    assert parse("a" * MAX_LOCAL + "@x.org").local == "a" * MAX_LOCAL
    assert invalid("a" * (MAX_LOCAL + 1) + "@x.org").safe == "local part too long"
    # measured on the canonical (quoted) text, quotes included
    assert parse('"' + " " * (MAX_LOCAL - 2) + '"@x.org')
    assert invalid('"' + " " * (MAX_LOCAL - 1) + '"@x.org').safe == "local part too long"


def test_limit_label_and_domain_edge():
    assert parse_domain("a" * 63 + ".org")
    with pytest.raises(MailError, match="label too long"):
        parse_domain("a" * 64 + ".org")
    domain = ".".join(["a" * 63] * 4)  # 255 octets
    assert len(domain) == MAX_DOMAIN and parse_domain(domain) == domain
    with pytest.raises(MailError, match="domain too long"):
        parse_domain(domain + "a")


def test_limit_path_edge():
    domain = ".".join(["b" * 63] * 3) + "." + "c" * 60  # 252 octets
    fits = "a" * (MAX_PATH - 2 - 1 - len(domain)) + "@" + domain
    assert len(fits) + 2 == MAX_PATH and parse(fits)
    assert invalid("a" + fits).safe == "address too long"


def test_idna_domain_stored_as_a_label_and_limit_on_stored_form():
    assert parse_domain("例え.テスト") == "xn--r8jz45g.xn--zckzah"
    with pytest.raises(MailError) as info:
        parse_domain("a" * 70 + "ü.org")  # the A-label would exceed 63
    assert info.value.safe == "invalid international domain name"


def test_parse_path_null_source_route_and_brackets():
    assert parse_path("<>") is None
    assert parse_path("<Alice@X.org>") == Address("alice", "x.org")
    assert parse_path("<@relay1.org,@relay2.org:bob@x.org>") == Address("bob", "x.org")
    for bad in ("alice@x.org", "<alice@x.org", "<@relay1.org,bob@x.org>", "<@bad_host:bob@x.org>"):
        with pytest.raises(MailError):
            parse_path(bad)


def test_relay_hack_detection():
    assert is_source_route("<@relay.org:bob@x.org>")
    assert is_source_route(" <@a.org,@b.org:bob@x.org>")
    assert not is_source_route("<bob@x.org>")
    assert is_percent_hack("user%other.org@x.org")
    assert is_bang_path("host!user@x.org")
    assert is_relay_hack(parse('"a%b"@x.org'))
    assert not is_relay_hack("plain@x.org")


# -- properties ---------------------------------------------------------------------

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
atom = st.text(ATEXT, min_size=1, max_size=8)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join)
quoted = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
label = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?\Z").filter(
    lambda s: s[2:4] != "--")  # "xn--"-like labels are A-labels with their own rules
domain_name = st.lists(label, min_size=1, max_size=4).map(".".join)
u_label_domain = st.sampled_from(["bücher.example", "münchen.de", "例え.テスト", "ÆØÅ.no"])
literal = st.one_of(st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
                    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded}]"))
raw_address = st.builds(lambda local, domain: f"{local}@{domain}",
                        st.one_of(dot_string, quoted),
                        st.one_of(domain_name, u_label_domain, literal))


@settings(max_examples=300)
@given(raw_address)
def test_parse_format_roundtrip(text):
    address = parse(text)
    assert parse(format_address(address)) == address
    assert format_address(parse(format_address(address))) == format_address(address)


@settings(max_examples=200)
@given(dot_string, domain_name)
def test_dot_string_and_domain_case_insensitive(local, domain):
    assert parse(f"{local.upper()}@{domain.upper()}") == parse(f"{local.lower()}@{domain.lower()}")


MAILISH = 'aAü.@"\\[]:<>%!-_ ,x1n\t\r\n\x00'


@settings(max_examples=500)
@given(st.one_of(st.text(), st.text(MAILISH, max_size=40), raw_address.map(lambda s: s + "\x7f"),
                 st.builds(lambda a, b: a + b, raw_address, st.text(MAILISH, max_size=5))))
def test_arbitrary_text_parses_or_invalid(text):
    for function in (parse, parse_path, parse_domain):
        try:
            result = function(text)
        except MailError as exc:
            assert exc.kind is ErrorKind.INVALID
        else:
            assert result is None or isinstance(result, (Address, str))
    assert isinstance(is_source_route(text), bool)


def test_huge_input_refused_cheaply():
    assert invalid("a" * 100_000 + "@x.org").safe == "address too long"
    with pytest.raises(MailError):
        parse(None)  # type: ignore[arg-type]
