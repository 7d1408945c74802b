"""Mail addresses per RFC 5321: parse, normalise, format, and spot relay hacks.

Owns the one canonical form of a mailbox address used as a directory key.
Pure functions, stdlib only; the only exception that escapes is
``MailError(INVALID)`` with a safe text naming what is wrong.

Grammar (RFC 5321 section 4.1.2)::

    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    Dot-string     = Atom *("." Atom)
    Atom           = 1*atext                       ; atext from RFC 5322 3.2.3
    Quoted-string  = DQUOTE *QcontentSMTP DQUOTE
    QcontentSMTP   = qtextSMTP / quoted-pairSMTP
    qtextSMTP      = %d32-33 / %d35-91 / %d93-126
    quoted-pairSMTP = %d92 %d32-126
    Domain         = sub-domain *("." sub-domain)
    sub-domain     = Let-dig [Ldh-str]
    Path           = "<" [ A-d-l ":" ] Mailbox ">"  ; A-d-l is a source route

Address literals (section 4.1.3): ``[1.2.3.4]`` and ``[IPv6:...]``; the
general form ``[tag:...]`` is refused (nothing we could deliver to).

Limits (section 4.5.3.1), measured on the *canonical* form, so that
``parse(format(a)) == a`` always holds: local part 64 octets, domain 255
octets, whole path ``<mailbox>`` 256 octets (so a mailbox of at most 254).
Raw input longer than :data:`MAX_INPUT` characters is refused before parsing.

Decisions (the canonical form, which the directory stores and looks up):

- **Domain**: case-insensitive.  Lowercased; a trailing dot is refused (an
  address names an absolute domain already); UTF-8 domains (U-labels) are
  accepted and stored as their A-label (``xn--``) form via the stdlib
  ``idna`` codec (IDNA 2003); ``xn--`` labels given directly must decode and
  re-encode to themselves, anything else is refused.  Labels are LDH, 1-63
  octets.  Address literals are normalised by :mod:`ipaddress`
  (``[IPv6:2001:db8::1]``, lower-case hex, compressed).
- **Local part**: RFC 5321 says the local part is case-sensitive, but every
  operator expects ``Alice@x`` and ``alice@x`` to be one mailbox.  Our one
  rule: a local part that is (or, once unquoted, could be written as) a
  Dot-string is **lowercased**; a local part that needs quoting (spaces,
  ``"``, ``\\``, ``@``, ``,``, empty atoms...) is kept **verbatim** and compared
  case-sensitively.  ``"Alice"@x`` is the same mailbox as ``alice@x``
  (section 4.1.2: quoting that is not needed changes nothing).
- An empty local part (``""@x``) is grammatical but refused: no mailbox can
  have it.  Non-ASCII local parts (SMTPUTF8, RFC 6531) are refused for now.

Relay-hack helpers (:func:`is_source_route`, :func:`is_percent_hack`,
:func:`is_bang_path`) let the MTA refuse ``<@a,@b:u@c>``, ``user%other@host``
and ``host!user@relay`` instead of relaying them.

Logs: nothing.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (registers the "idna" codec explicitly)
import ipaddress
import re
from dataclasses import dataclass

from intermail.errors import ErrorKind, MailError

MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, including "<" and ">"
MAX_LABEL = 63  # RFC 1035 2.3.4
MAX_INPUT = 1024  # raw text refused before any parsing: bounds the work per address

# RFC 5322 3.2.3 atext
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
# RFC 5321 4.1.2 Dot-string = Atom *("." Atom)
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# RFC 5321 4.1.2 Quoted-string = DQUOTE *QcontentSMTP DQUOTE
_QUOTED_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"')
_QUOTED_PAIR = re.compile(r"\\([\x20-\x7e])")
# RFC 5321 4.1.2 sub-domain = Let-dig [Ldh-str]  (after IDNA: ASCII, lower case)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# RFC 5321 4.1.2 A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain
_SOURCE_ROUTE = re.compile(r"<\s*@[^:<>]*:")


def _invalid(safe: str, detail: str | None = None) -> MailError:
    return MailError(ErrorKind.INVALID, safe=safe, detail=detail)


@dataclass(frozen=True, order=True)
class Address:
    """A mailbox in canonical form; build one with :func:`parse`, not by hand.

    ``local`` is the unquoted local part (lowercased if it is a Dot-string),
    ``domain`` the lower-case A-label domain or a normalised address literal.
    ``str(address)`` is the canonical text: the directory key.
    """

    local: str
    domain: str

    @property
    def quoted(self) -> bool:
        """True when the local part must be written as a Quoted-string."""
        return _DOT_STRING.fullmatch(self.local) is None

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return format_address(self)


def format_address(address: Address) -> str:
    """The canonical text of ``address`` (quotes the local part only when needed)."""
    local = address.local
    if address.quoted:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{address.domain}"


def parse(text: str) -> Address:
    """Parse a bare mailbox (``local@domain``) into its canonical :class:`Address`."""
    if not isinstance(text, str):
        raise _invalid("address must be text")
    if len(text) > MAX_INPUT:
        raise _invalid("address too long")
    if not text:
        raise _invalid("empty address")
    local_raw, rest = _split_local(text)
    if not rest.startswith("@"):
        raise _invalid("address has no @domain", f"no @ after local part in {text!r}")
    local = _normalise_local(local_raw)
    domain = parse_domain(rest[1:])
    address = Address(local, domain)
    canonical = format_address(address)
    if len(canonical) - len(domain) - 1 > MAX_LOCAL:
        raise _invalid("local part too long")
    if len(canonical) + 2 > MAX_PATH:
        raise _invalid("address too long")
    return address


def parse_path(text: str) -> Address | None:
    """Parse an SMTP reverse/forward path ``<...>``; ``<>`` (null path) is None.

    A source route (``<@a,@b:user@c>``) is accepted and ignored as RFC 5321
    section 3.3 and appendix C allow; use :func:`is_source_route` first to
    refuse it instead.
    """
    if not isinstance(text, str):
        raise _invalid("address must be text")
    if len(text) > MAX_INPUT:
        raise _invalid("address too long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise _invalid("path must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        return None
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise _invalid("malformed source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise _invalid("malformed source route")
            parse_domain(hop[1:])
        inner = mailbox
    return parse(inner)


def parse_domain(text: str) -> str:
    """Canonical form of a domain or address literal (see the module docstring)."""
    if not isinstance(text, str):
        raise _invalid("domain must be text")
    if len(text) > MAX_INPUT:
        raise _invalid("domain too long")
    if text.startswith("["):
        return _parse_literal(text)
    if not text:
        raise _invalid("empty domain")
    if text.isascii():
        ascii_domain = text.lower()
    else:
        try:
            ascii_domain = text.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise _invalid("invalid international domain name", str(exc)) from None
    if ascii_domain.endswith("."):
        raise _invalid("domain must not end with a dot")
    if len(ascii_domain) > MAX_DOMAIN:
        raise _invalid("domain too long")
    for label in ascii_domain.split("."):
        if not label:
            raise _invalid("empty label in domain")
        if len(label) > MAX_LABEL:
            raise _invalid("domain label too long")
        if not _LABEL.fullmatch(label):
            raise _invalid("invalid character in domain")
        if label.startswith("xn--"):
            _check_a_label(label)
    return ascii_domain


def _check_a_label(label: str) -> None:
    try:
        unicode_label = label.encode("ascii").decode("idna")
        if unicode_label.encode("idna").decode("ascii").lower() != label:
            raise UnicodeError("A-label does not round-trip")
    except UnicodeError as exc:
        raise _invalid("invalid international domain name", str(exc)) from None


def _parse_literal(text: str) -> str:
    # RFC 5321 4.1.3: IPv4-address-literal / IPv6-address-literal / General-address-literal
    if not text.endswith("]") or len(text) < 3:
        raise _invalid("malformed address literal")
    body = text[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            ip6 = ipaddress.IPv6Address(body[5:])
            return f"[IPv6:{ip6.compressed}]"
        if ":" in body:
            raise _invalid("unsupported address literal")
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise _invalid("malformed address literal") from None


def _split_local(text: str) -> tuple[str, str]:
    """Split ``text`` into the raw local part and the rest (starting at the '@')."""
    if text.startswith('"'):
        match = _QUOTED_STRING.match(text)
        if match is None:
            raise _invalid("malformed quoted local part")
        return match.group(0), text[match.end():]
    at = text.rfind("@")
    if at < 0:
        raise _invalid("address has no @domain")
    return text[:at], text[at:]


def _normalise_local(raw: str) -> str:
    if raw.startswith('"'):
        local = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        if not local:
            raise _invalid("empty local part")
        if _DOT_STRING.fullmatch(local):
            return local.lower()  # quoting that was not needed changes nothing
        return local
    if not raw:
        raise _invalid("empty local part")
    if not raw.isascii():
        raise _invalid("non-ASCII local part not supported")
    if not _DOT_STRING.fullmatch(raw):
        raise _invalid("invalid character in local part")
    return raw.lower()


def is_source_route(path: str) -> bool:
    """True for a path carrying a source route, ``<@relay1,@relay2:user@host>``."""
    return isinstance(path, str) and _SOURCE_ROUTE.match(path.lstrip()) is not None


def is_percent_hack(address: Address | str) -> bool:
    """True for ``user%other@host``: asks ``host`` to relay to ``other``."""
    return "%" in _local_of(address)


def is_bang_path(address: Address | str) -> bool:
    """True for UUCP bang paths, ``host!user@relay``: asks ``relay`` to relay on."""
    return "!" in _local_of(address)


def is_relay_hack(address: Address | str) -> bool:
    """Percent hack or bang path: an MTA must not relay either."""
    return is_percent_hack(address) or is_bang_path(address)


def _local_of(address: Address | str) -> str:
    if isinstance(address, Address):
        return address.local
    return parse(address).local
