"""Command-line grammar of SMTP and LMTP: verbs, paths, ESMTP parameters, BDAT, xtext.

Owns: turning one command line (the bytes before its CRLF) into a verb and
typed arguments, for RFC 5321 with the extensions the LMTP server speaks:
RFC 2033 (LHLO), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 3030 (CHUNKING,
BDAT), RFC 6531 (SMTPUTF8), RFC 3461 §4 (xtext, for parameter values that
carry addresses).  It does not know the session state, which parameters a
server supports or which reply a problem earns: the machine
(:mod:`.lmtp_server`) decides that from :attr:`GrammarError.problem`.

Each regex sits next to the ABNF it implements, with the RFC section.

Invariants:

- Every function returns or raises :class:`GrammarError` (a
  ``RemoteProtocolError``), whatever the input -- fuzzed in the tests.
- A path is returned exactly as written between its angle brackets (case,
  quoting and escapes untouched), with one exception: a source route
  (``<@relay:user@example.test>``, RFC 5321 §4.1.2 ``A-d-l``) is dropped, as
  §4.1.1.3 and §3.3 tell servers to ignore it.  Nothing beyond the ABNF is
  checked: Snum ranges, IPv6 syntax (an ``IPv6:`` literal is matched by the
  General-address-literal rule, whose character set covers it), IDNA
  validity of U-labels and length limits belong to the address layer.
- UTF-8 is allowed in paths and parameter values only with SMTPUTF8
  (RFC 6531 §3.3, §3.4); without it, a path that would be valid with it is
  reported as :attr:`Problem.NON_ASCII` (reply 553 5.6.7), not as a syntax
  error.
- Parsing is linear in the line length: the repeated parts of the patterns
  are possessive or atomic, so no input can make the regex engine backtrack
  over what it has matched.

Logs: nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from intermail.errors import RemoteProtocolError

__all__ = [
    "Problem",
    "GrammarError",
    "PathArgs",
    "BODY_VALUES",
    "split_command",
    "parse_mail",
    "parse_rcpt",
    "parse_lhlo",
    "parse_bdat",
    "parse_size_value",
    "is_domain_or_literal",
    "is_ehlo_line",
    "is_esmtp_keyword",
    "decode_xtext",
    "encode_xtext",
]


class Problem(enum.Enum):
    """What is wrong with a command line; the machine maps each to a reply."""

    SYNTAX = "syntax"  # the command's structure is wrong: 501 5.5.2
    ARGUMENTS = "arguments"  # arguments out of range or not allowed: 501 5.5.4
    SENDER = "sender"  # the reverse-path is not a valid path: 501 5.1.7
    RECIPIENT = "recipient"  # the forward-path is not a valid path: 501 5.1.3
    NON_ASCII = "non-ascii"  # a UTF-8 path without SMTPUTF8: 553 5.6.7
    PARAMETER = "parameter"  # malformed or repeated esmtp-param: 501 5.5.4


class GrammarError(RemoteProtocolError):
    """A command line that does not match its grammar.

    ``chunk_size`` is set when a malformed BDAT still names a usable chunk
    size, so that the machine can skip the chunk and stay in sync.
    """

    def __init__(self, problem: Problem, text: str, chunk_size: int | None = None):
        super().__init__(text)
        self.problem = problem
        self.chunk_size = chunk_size


@dataclasses.dataclass(frozen=True)
class PathArgs:
    """The arguments of MAIL or RCPT: the path and the ESMTP parameters.

    ``params`` maps each esmtp-keyword, upper-cased (keywords are
    case-insensitive, RFC 5321 §2.4), to its esmtp-value as written, or
    None for a keyword without a value.
    """

    path: str
    params: dict[str, str | None] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Building blocks (strings; compiled below).  _U is what RFC 6531 §3.3 adds to
# the character sets: UTF8-non-ascii, i.e. any non-ASCII character once the
# line has been decoded as UTF-8 (strict decoding has excluded surrogates).

_U = "\u0080-\U0010ffff"


def _path_pattern(utf8: bool) -> str:
    u = _U if utf8 else ""
    # RFC 5321 §4.1.2
    #   Let-dig      = ALPHA / DIGIT
    #   Ldh-str      = *( ALPHA / DIGIT / "-" ) Let-dig
    #   sub-domain   = Let-dig [Ldh-str]
    #   Domain       = sub-domain *("." sub-domain)
    # RFC 6531 §3.3
    #   sub-domain   =/ U-label      (here: Let-dig or UTF8-non-ascii; IDNA checks are not ABNF)
    let_dig = f"[A-Za-z0-9{u}]"
    sub_domain = f"(?>{let_dig}(?:[A-Za-z0-9{u}-]*{let_dig})?)"
    domain = rf"{sub_domain}(?:\.{sub_domain})*+"
    # RFC 5321 §4.1.2
    #   Local-part      = Dot-string / Quoted-string
    #   Dot-string      = Atom *("."  Atom)
    #   Atom            = 1*atext                    (atext: RFC 5322 §3.2.3)
    #   Quoted-string   = DQUOTE *QcontentSMTP DQUOTE
    #   QcontentSMTP    = qtextSMTP / quoted-pairSMTP
    #   quoted-pairSMTP = %d92 %d32-126
    #   qtextSMTP       = %d32-33 / %d35-91 / %d93-126
    # RFC 6531 §3.3
    #   atext     =/ UTF8-non-ascii
    #   qtextSMTP =/ UTF8-non-ascii
    atom = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~" + u + "-]++"
    dot_string = rf"{atom}(?:\.{atom})*+"
    quoted_string = '"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e' + u + r']|\\[\x20-\x7e])*+"'
    local_part = f"(?:{dot_string}|{quoted_string})"
    # RFC 5321 §4.1.2
    #   Mailbox  = Local-part "@" ( Domain / address-literal )
    #   Path     = "<" [ A-d-l ":" ] Mailbox ">"
    #   A-d-l    = At-domain *( "," At-domain )
    #   At-domain = "@" Domain
    mailbox = f"{local_part}@(?:{domain}|{_ADDRESS_LITERAL})"
    adl = f"@{domain}(?:,@{domain})*+"
    return f"<(?:{adl}:)?(?P<mailbox>{mailbox})>"


# RFC 5321 §4.1.3
#   address-literal  = "[" ( IPv4-address-literal / IPv6-address-literal /
#                            General-address-literal ) "]"
#   IPv4-address-literal     = Snum 3("."  Snum)
#   Snum                     = 1*3DIGIT
#   IPv6-address-literal     = "IPv6:" IPv6-addr
#   General-address-literal  = Standardized-tag ":" 1*dcontent
#   Standardized-tag         = Ldh-str
#   dcontent                 = %d33-90 / %d94-126
# An IPv6 literal is also a General-address-literal (tag "IPv6", and hex
# digits, ":" and "." are dcontent), so the union needs no IPv6 rule.
_ADDRESS_LITERAL = r"\[(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|(?>[A-Za-z0-9-]*[A-Za-z0-9]):[\x21-\x5a\x5e-\x7e]++)\]"

# RFC 5321 §4.1.2
#   esmtp-param    = esmtp-keyword ["=" esmtp-value]
#   esmtp-keyword  = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#   esmtp-value    = 1*(%d33-60 / %d62-126)
# RFC 6531 §3.3
#   esmtp-value    =/ UTF8-non-ascii
_ESMTP_KEYWORD = "[A-Za-z0-9][A-Za-z0-9-]*+"
_ESMTP_PARAM = re.compile(f"({_ESMTP_KEYWORD})(?:=([\\x21-\\x3c\\x3e-\\x7e{_U}]++))?")
_KEYWORD = re.compile(_ESMTP_KEYWORD)

# RFC 5321 §4.1.1.2
#   mail = "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF
#   Reverse-path = Path / "<>"
_MAIL = re.compile(f"(?i:FROM:)(?:<>|{_path_pattern(utf8=True)})")

# RFC 5321 §4.1.1.3
#   rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" /
#               Forward-path ) [SP Rcpt-parameters] CRLF
#   Forward-path = Path
# ("<Postmaster@" Domain ">" is a Path already; "Postmaster" is case-insensitive, §4.5.1.)
_RCPT = {
    utf8: re.compile(f"(?i:TO:)(?:<(?P<postmaster>(?i:postmaster))>|{_path_pattern(utf8)})")
    for utf8 in (False, True)
}
_MAIL_HEAD = re.compile("(?i:FROM:)<")
_RCPT_HEAD = re.compile("(?i:TO:)<")

# RFC 5321 §4.1.1.1 and RFC 2033 §4.1
#   ehlo = "EHLO" SP ( Domain / address-literal ) CRLF      (LHLO: the same)
_ASCII_DOMAIN = (
    "(?>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\\.(?>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*+"
)
_DOMAIN_OR_LITERAL = re.compile(f"{_ASCII_DOMAIN}|{_ADDRESS_LITERAL}")

# RFC 5321 §4.1.1.1
#   ehlo-line    = ehlo-keyword *( SP ehlo-param )
#   ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#   ehlo-param   = 1*(%d33-126)
_EHLO_LINE = re.compile(f"{_ESMTP_KEYWORD}(?: [\\x21-\\x7e]++)*+")

# RFC 3030 §2
#   bdat-cmd   ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF
#   chunk-size ::= 1*DIGIT
#   end-marker ::= "LAST"
# Sizes of more than 20 significant digits are refused outright: no such
# chunk can be within any message size limit, and int() of a huge digit
# string is refused by CPython (sys.int_info.default_max_str_digits).
_BDAT = re.compile(rb"([0-9]++)(?: ((?i:LAST)))?")
_BDAT_SIZE = re.compile(rb"[0-9]++")
_MAX_SIZE_DIGITS = 20

# RFC 1870 §3 (SIZE)
#   size-value ::= 1*20DIGIT
_SIZE_VALUE = re.compile("[0-9]{1,20}")

# RFC 6152 §2 (8BITMIME) and RFC 1652
#   body-value ::= "7BIT" / "8BITMIME"
# (RFC 3030's "BINARYMIME" is not offered by our server.)
BODY_VALUES = frozenset({"7BIT", "8BITMIME"})

# RFC 3461 §4 (xtext)
#   xtext   = *( xchar / hexchar )
#   xchar   = any ASCII CHAR between "!" (33) and "~" (126) inclusive,
#             except for "+" and "=".
#   hexchar = ASCII "+" immediately followed by two upper case
#             hexadecimal digits
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*+")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_XCHARS = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}


# ---------------------------------------------------------------------------
# Command lines


def split_command(line: bytes) -> tuple[str, bytes | None]:
    """(verb, arguments) of a command line without its CRLF.

    RFC 5321 §4.1.1: ``verb [SP args]``; verbs are case-insensitive, so the
    verb comes back upper-cased; a verb that is not all ASCII letters comes
    back as ``""`` (no command has it).  The arguments are the bytes after the
    first SP, or None when there is no SP at all.
    """
    verb, space, args = line.partition(b" ")
    name = verb.decode("ascii").upper() if verb.isalpha() else ""  # bytes.isalpha(): ASCII letters only
    return name, (args if space else None)


def _decode(args: bytes, what: str) -> str:
    try:
        return args.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(Problem.SYNTAX, f"{what} is not valid UTF-8") from None


def _parse_params(text: str, utf8: bool) -> dict[str, str | None]:
    """``Mail-parameters`` / ``Rcpt-parameters``: esmtp-param *(SP esmtp-param)."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        match = _ESMTP_PARAM.fullmatch(item)
        if match is None:
            raise GrammarError(Problem.PARAMETER, "malformed parameter")
        keyword, value = match.group(1).upper(), match.group(2)
        if value is not None and not utf8 and not value.isascii():
            raise GrammarError(Problem.PARAMETER, "non-ASCII parameter value without SMTPUTF8")
        if keyword in params:
            raise GrammarError(Problem.PARAMETER, f"parameter {keyword} given twice")
        params[keyword] = value
    return params


def _split_rest(text: str, end: int) -> str | None:
    """The parameter text after a path ending at ``end``: None if there is none."""
    rest = text[end:]
    if not rest:
        return None
    if rest[0] != " " or len(rest) == 1:
        raise GrammarError(Problem.SYNTAX, "expected a space and parameters after the path")
    return rest[1:]


def parse_mail(args: bytes | None) -> PathArgs:
    """The arguments of ``MAIL`` (everything after ``MAIL SP``).

    The null reverse-path ``<>`` gives ``path == ""``.  UTF-8 is allowed in
    the path and the parameter values when the parameters include SMTPUTF8.
    """
    text = _decode(args or b"", "MAIL argument")
    if not _MAIL_HEAD.match(text):
        raise GrammarError(Problem.SYNTAX, "expected MAIL FROM:<reverse-path>")
    match = _MAIL.match(text)
    if match is None:
        raise GrammarError(Problem.SENDER, "malformed reverse-path")
    rest = _split_rest(text, match.end())
    params = _parse_params(rest, utf8=True) if rest is not None else {}
    utf8 = "SMTPUTF8" in params
    if not utf8:
        if rest is not None and not rest.isascii():
            raise GrammarError(Problem.PARAMETER, "non-ASCII parameter value without SMTPUTF8")
        if not match.group(0).isascii():
            raise GrammarError(Problem.NON_ASCII, "non-ASCII address without SMTPUTF8")
    return PathArgs(match.group("mailbox") or "", params)


def parse_rcpt(args: bytes | None, *, utf8: bool = False) -> PathArgs:
    """The arguments of ``RCPT`` (after ``RCPT SP``); ``utf8``: the MAIL had SMTPUTF8."""
    text = _decode(args or b"", "RCPT argument")
    if not _RCPT_HEAD.match(text):
        raise GrammarError(Problem.SYNTAX, "expected RCPT TO:<forward-path>")
    match = _RCPT[utf8].match(text)
    if match is None:
        if not utf8 and _RCPT[True].match(text):
            raise GrammarError(Problem.NON_ASCII, "non-ASCII address without SMTPUTF8")
        raise GrammarError(Problem.RECIPIENT, "malformed forward-path")
    rest = _split_rest(text, match.end())
    params = _parse_params(rest, utf8) if rest is not None else {}
    return PathArgs(match.group("postmaster") or match.group("mailbox"), params)


def parse_lhlo(args: bytes | None) -> str:
    """The client's name in ``LHLO SP ( Domain / address-literal )``."""
    if args is not None and _DOMAIN_OR_LITERAL.fullmatch(args.decode("latin-1")):
        return args.decode("ascii")
    raise GrammarError(Problem.ARGUMENTS, "expected LHLO <domain or address literal>")


def parse_bdat(args: bytes | None) -> tuple[int, bool]:
    """(chunk size, LAST?) of ``BDAT SP chunk-size [SP "LAST"]``.

    On error, :attr:`GrammarError.chunk_size` carries the size when the
    arguments at least start with one, so that the chunk can be skipped.
    """
    match = _BDAT.fullmatch(args) if args is not None else None
    if match is None:
        digits = _BDAT_SIZE.match(args) if args is not None else None
        chunk_size = _chunk_size(digits.group(0)) if digits else None
        raise GrammarError(Problem.ARGUMENTS, "expected BDAT <size> [LAST]", chunk_size)
    size = _chunk_size(match.group(1))
    if size is None:
        raise GrammarError(Problem.ARGUMENTS, f"BDAT size of more than {_MAX_SIZE_DIGITS} digits")
    return size, match.group(2) is not None


def _chunk_size(digits: bytes) -> int | None:
    significant = digits.lstrip(b"0")
    return int(significant or b"0") if len(significant) <= _MAX_SIZE_DIGITS else None


def parse_size_value(value: str | None) -> int:
    """The value of the MAIL ``SIZE=`` parameter (RFC 1870 size-value)."""
    if value is None or not _SIZE_VALUE.fullmatch(value):
        raise GrammarError(Problem.ARGUMENTS, "SIZE needs a value of 1 to 20 digits")
    return int(value)


def is_domain_or_literal(text: str) -> bool:
    """``Domain / address-literal`` in ASCII: a valid LHLO argument or server hostname."""
    return isinstance(text, str) and _DOMAIN_OR_LITERAL.fullmatch(text) is not None


def is_ehlo_line(text: str) -> bool:
    """An ``ehlo-line`` (a capability line of the LHLO reply), RFC 5321 §4.1.1.1."""
    return isinstance(text, str) and _EHLO_LINE.fullmatch(text) is not None


def is_esmtp_keyword(text: str) -> bool:
    return isinstance(text, str) and _KEYWORD.fullmatch(text) is not None


# ---------------------------------------------------------------------------
# xtext (RFC 3461 §4): how parameter values carry arbitrary octets, e.g. an
# address in a delivery-key parameter.


def decode_xtext(value: str) -> str:
    """The text an xtext value encodes (its octets read as UTF-8)."""
    if not _XTEXT.fullmatch(value):
        raise GrammarError(Problem.ARGUMENTS, "malformed xtext")
    raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value).encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(Problem.ARGUMENTS, "xtext does not encode UTF-8") from None


def encode_xtext(text: str) -> str:
    """``text`` (as UTF-8 octets) in xtext: xchars stay, every other octet becomes ``+XX``."""
    return "".join(chr(b) if b in _XCHARS else f"+{b:02X}" for b in text.encode("utf-8"))
