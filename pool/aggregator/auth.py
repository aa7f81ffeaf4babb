"""Who may read and act through the aggregator's HTTP API.

Bearer tokens from `PLUGINPOOL_API_TOKENS` (token → role): a `viewer` reads, an `operator`
also acts. Missing or wrong token: 401; a viewer acting: 403. With no tokens configured
the API is read-only and answers loopback peers only (it used to be open to whoever could
reach it), so nothing on the network can act or read without a token.

Actions are POSTs with a JSON body. Since the token travels in the Authorization header
(never a cookie), another site's page cannot make a browser send it; still, a browser's
POST (it sends Origin or Sec-Fetch-Site) must also carry X-CSRF-Token, the HMAC of its
token that /api/whoami hands the dashboard, and come from the same origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from pluginpool.policy.errors import AuthError

ROLES = ("viewer", "operator")
CSRF_CONTEXT = b"pluginpool-csrf"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its role and a name for the audit log (never the token)."""

    role: str
    who: str
    token: str | None = None

    @property
    def can_act(self) -> bool:
        return self.role == "operator"

    @property
    def csrf(self) -> str | None:
        return None if self.token is None else csrf_token(self.token)


def csrf_token(token: str) -> str:
    """Stateless, so every aggregator replica accepts it."""
    return hmac.new(token.encode(), CSRF_CONTEXT, hashlib.sha256).hexdigest()[:32]


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        bad = sorted({role for role in tokens.values() if role not in ROLES})
        if bad:
            raise ValueError(f"unknown API roles {bad}: use viewer or operator")
        self._tokens = dict(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, headers: Mapping[str, str], *, peer: str) -> Identity:
        """The caller (`headers` with lower-case names), or AuthError: 401 for a missing or
        wrong token, 403 off loopback when no tokens are configured."""
        if not self._tokens:
            if not is_loopback(peer):
                raise AuthError("this API answers loopback only until PLUGINPOOL_API_TOKENS "
                                "is set", status=403)
            return Identity(role="viewer", who="anonymous@loopback")
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("a bearer token is required", status=401)
        for known, role in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Identity(role=role, who=f"token:{fingerprint(known)}", token=known)
        raise AuthError("unknown token", status=401)

    @staticmethod
    def check_action(identity: Identity, headers: Mapping[str, str]) -> None:
        """An operator's POST: JSON, and for a browser same-origin with its CSRF token."""
        if not identity.can_act:
            raise AuthError(f"role {identity.role!r} cannot act: an operator token is "
                            "required", status=403)
        media_type = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":  # not application/jsonx
            raise AuthError("actions are POSTs with Content-Type: application/json",
                            status=415)
        origin = headers.get("origin")
        if origin is None and headers.get("sec-fetch-site") is None:
            return  # not a browser: the bearer token alone suffices
        if origin is not None and urlsplit(origin).netloc != headers.get("host"):
            raise AuthError("cross-origin action refused", status=403)
        sent = headers.get("x-csrf-token") or ""
        if identity.csrf is None or not hmac.compare_digest(sent, identity.csrf):
            raise AuthError("missing or wrong X-CSRF-Token", status=403)
