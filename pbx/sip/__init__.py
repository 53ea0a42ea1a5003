"""The SIP stack: sans-IO codec, transactions, transport and the endpoint on top.

This is the package's public face; other packages import only from here.
"""

from pbx.sip.abuse import SecurityPolicy, SourceGuard, Verdict
from pbx.sip.auth import (
    CachedCredentialLookup,
    CredentialLookup,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    compute_ha1,
)
from pbx.sip.codec import (
    MAX_MESSAGE_SIZE,
    URI,
    CSeq,
    Headers,
    NameAddress,
    Request,
    Response,
    SIPMessage,
    SIPParseError,
    StreamFramer,
    Via,
    make_response,
    parse,
)
from pbx.sip.endpoint import SIPEndpoint
from pbx.sip.location import Binding, BindingPersistence, LocationService
from pbx.sip.registrar import Registrar, RegistrarPolicy
from pbx.sip.transactions import (
    MAGIC_COOKIE,
    ClientTransaction,
    ClientTransactionUser,
    MessageSender,
    Peer,
    ServerTransaction,
    TransactionManager,
    TransactionUser,
    TransportError,
    new_branch,
)
from pbx.sip.transport import SIPTransport

__all__ = [
    "MAGIC_COOKIE",
    "MAX_MESSAGE_SIZE",
    "URI",
    "Binding",
    "BindingPersistence",
    "CSeq",
    "CachedCredentialLookup",
    "ClientTransaction",
    "ClientTransactionUser",
    "CredentialLookup",
    "Credentials",
    "DigestAuthenticator",
    "DigestPolicy",
    "Headers",
    "LocationService",
    "MessageSender",
    "NameAddress",
    "Peer",
    "Registrar",
    "RegistrarPolicy",
    "Request",
    "Response",
    "SIPEndpoint",
    "SIPMessage",
    "SIPParseError",
    "SIPTransport",
    "SecurityPolicy",
    "ServerTransaction",
    "SourceGuard",
    "StreamFramer",
    "TransactionManager",
    "TransactionUser",
    "TransportError",
    "Verdict",
    "Via",
    "compute_ha1",
    "make_response",
    "new_branch",
    "parse",
]
