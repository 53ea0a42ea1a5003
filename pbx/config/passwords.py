"""Password and token strength, and secure generation.

One implementation shared by the validator (extension passwords, the API token) and both
setup wizards (refusing weak input, the strength indicator), so an operator never sees a
password accepted by one and rejected by another.

The checks are deliberately simple and explainable: a minimum length, a short list of
passwords every attacker tries first, keyboard/alphabet/digit runs, repeats, and passwords
built from the extension number.  Each problem is a :class:`Weakness` with a stable code so
callers can map it to their own codes (``EXT_PASSWORD_TOO_SHORT``...).
"""

from __future__ import annotations

import math
import re
import secrets
import string
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "MIN_TOKEN_LENGTH",
    "Strength",
    "Weakness",
    "check_password",
    "check_token",
    "generate_password",
    "generate_secret",
    "generate_token",
    "strength",
]

#: Shortest extension password accepted without a finding.
MIN_PASSWORD_LENGTH: Final = 12
#: Shortest API token accepted (``generate_token`` makes 43 characters).
MIN_TOKEN_LENGTH: Final = 32

# Letters and digits only: SIP phones are configured through web forms and keypads that
# mangle quotes, '#', '&' and friends.  20 of 62 symbols is ~119 bits.
_PASSWORD_ALPHABET: Final = string.ascii_letters + string.digits

#: The passwords tried first by SIP scanners (friendly-scanner/sipvicious lists) and the
#: placeholders people leave in.  Compared case-insensitively, also with digits stripped
#: from the end ("password123" is "password").
_COMMON_TEXT: Final = """
password passw0rd p@ssw0rd p@ssword pass pwd secret secrets changeme change_me change-me
changeit default admin administrator root toor guest user test tester testing demo
letmein welcome welcome1 hello iloveyou monkey dragon master shadow sunshine princess
football baseball superman batman trustno1 freedom whatever qwerty qwertz azerty
asdf asdfgh asdfghjkl zxcvbn zxcvbnm abc abcd abcdef abcdefg abc123 a1b2c3 qazwsx
1q2w3e 1q2w3e4r 1qaz2wsx letmein1 login voip sip phone asterisk freeswitch pbx
kamailio opensips polycom cisco yealink grandstream snom linksys token example
summer winter spring autumn company office
"""
COMMON_PASSWORDS: Final = frozenset(_COMMON_TEXT.split())

_KEYBOARD_ROWS: Final = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890", "qwertzuiop",
                         "azertyuiop", "0987654321")


@dataclass(frozen=True, slots=True)
class Weakness:
    """One reason a password or token is weak; ``code`` is stable, ``message`` is for humans."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Strength:
    """Score for a strength indicator: 0 (unusable) .. 4 (strong), with the reasons."""

    score: int
    label: str
    bits: float
    weaknesses: tuple[Weakness, ...]


def generate_password(length: int = 20) -> str:
    """A random letters-and-digits password with at least one lower, upper and digit."""
    if length < MIN_PASSWORD_LENGTH:
        raise ValueError(f"generated passwords are at least {MIN_PASSWORD_LENGTH} characters")
    while True:
        candidate = "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))
        if (any(c.islower() for c in candidate) and any(c.isupper() for c in candidate)
                and any(c.isdigit() for c in candidate) and not check_password(candidate)):
            return candidate


def generate_token() -> str:
    """An API bearer token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def generate_secret() -> str:
    """A 256-bit hex secret (the digest nonce HMAC key, ``PBX_AUTH__SECRET``)."""
    return secrets.token_hex(32)


def _has_run(text: str, length: int) -> bool:
    """True when ``text`` holds ``length`` consecutive alphabet/keyboard steps (abcd, 4321)."""
    lowered = text.lower()
    sources = (string.ascii_lowercase, string.digits, *_KEYBOARD_ROWS)
    for source in sources:
        for seq in (source, source[::-1]):
            for start in range(len(seq) - length + 1):
                if seq[start:start + length] in lowered:
                    return True
    return False


def _is_repetition(text: str) -> bool:
    """True for text made of one short unit repeated (aaaa, 1212, abcabc)."""
    for unit in range(1, len(text) // 2 + 1):
        if len(text) % unit == 0 and text[:unit] * (len(text) // unit) == text:
            return True
    return False


def _common(text: str) -> bool:
    lowered = text.lower()
    stripped = lowered.rstrip(string.digits + "!.?_-@#$")
    base = lowered.lstrip(string.digits)
    return lowered in COMMON_PASSWORDS or stripped in COMMON_PASSWORDS or base in COMMON_PASSWORDS


def check_password(password: str, *, number: str | None = None,
                   min_length: int = MIN_PASSWORD_LENGTH) -> list[Weakness]:
    """Every reason ``password`` is weak for a SIP extension (empty list = acceptable).

    ``number`` is the extension number: a password equal to it, or containing it, is the
    first thing a scanner tries.
    """
    found: list[Weakness] = []
    if not password:
        return [Weakness("EMPTY", "the password is empty")]
    if number and password == number:
        found.append(Weakness("IS_NUMBER", "the password is the extension number"))
    elif number and len(number) >= 2 and number in password:
        found.append(Weakness("CONTAINS_NUMBER", "the password contains the extension number"))
    if len(password) < min_length:
        found.append(Weakness("TOO_SHORT",
                              f"the password has {len(password)} characters; use at least "
                              f"{min_length}"))
    if _common(password):
        found.append(Weakness("COMMON", "the password is on the list of common passwords"))
    if len(password) > 1 and _is_repetition(password):
        found.append(Weakness("REPEATED", "the password repeats one short pattern"))
    elif _has_run(password, 4) and _run_dominates(password):
        found.append(Weakness("SEQUENCE",
                              "the password is mostly a keyboard or alphabet sequence"))
    elif len(set(password)) < max(4, len(password) // 3):
        found.append(Weakness("LOW_VARIETY", "the password uses too few different characters"))
    return found


def _run_dominates(text: str) -> bool:
    """True when removing sequences of 4+ leaves fewer than 6 characters of substance."""
    lowered = text.lower()
    sources = (string.ascii_lowercase, string.digits, *_KEYBOARD_ROWS)
    for source in sources:
        for seq in (source, source[::-1]):
            for size in range(len(seq), 3, -1):
                for start in range(len(seq) - size + 1):
                    chunk = seq[start:start + size]
                    if chunk in lowered:
                        lowered = lowered.replace(chunk, "")
    return len(lowered) < 6


def check_token(token: str) -> list[Weakness]:
    """Every reason ``token`` is a weak API bearer token (empty list = acceptable)."""
    found: list[Weakness] = []
    if len(token) < MIN_TOKEN_LENGTH:
        found.append(Weakness("TOO_SHORT",
                              f"the token has {len(token)} characters; use at least "
                              f"{MIN_TOKEN_LENGTH}"))
    if _common(token) or re.fullmatch(r"(?i)(your|my|the)?[-_]?(api)?[-_]?token[-_]?(here)?",
                                      token):
        found.append(Weakness("COMMON", "the token is a placeholder or common value"))
    if token and (_is_repetition(token) or len(set(token)) < 10):
        found.append(Weakness("LOW_VARIETY", "the token uses too few different characters"))
    return found


def _pool_size(password: str) -> int:
    pool = 0
    if any(c.islower() for c in password):
        pool += 26
    if any(c.isupper() for c in password):
        pool += 26
    if any(c.isdigit() for c in password):
        pool += 10
    if any(not c.isalnum() for c in password):
        pool += 33
    return max(pool, 1)


def strength(password: str, *, number: str | None = None) -> Strength:
    """A 0-4 score for an indicator: estimated bits, capped at 1 when any weakness exists."""
    weaknesses = tuple(check_password(password, number=number))
    bits = len(password) * math.log2(_pool_size(password)) if password else 0.0
    if not password:
        score = 0
    elif weaknesses:
        score = 0 if any(w.code in ("IS_NUMBER", "COMMON", "EMPTY") for w in weaknesses) else 1
    elif bits < 60:
        score = 2
    elif bits < 90:
        score = 3
    else:
        score = 4
    label = ("unusable", "weak", "fair", "good", "strong")[score]
    return Strength(score, label, round(bits, 1), weaknesses)
