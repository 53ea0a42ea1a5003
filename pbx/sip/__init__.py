"""The SIP stack: sans-IO codec, transactions, transport and the endpoint on top.

This is the package's public face; other packages import only from here.
"""

from pbx.sip import sdp
from pbx.sip.abuse import SecurityPolicy, SourceGuard, Verdict
from pbx.sip.auth import (
    AuthOutcome,
    CachedCredentialLookup,
    CredentialDirectory,
    CredentialLookup,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    NonceState,
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
from pbx.sip.dialog import Dialog, DialogId, DialogTable, new_tag
from pbx.sip.endpoint import SIPEndpoint
from pbx.sip.location import Binding, BindingPersistence, LocationService
from pbx.sip.methods import KNOWN_METHODS, method_label, status_label
from pbx.sip.registrar import Registrar, RegistrarPolicy
from pbx.sip.sdp import SDPError, SessionDescription
from pbx.sip.stream import StreamLimits
from pbx.sip.tls import ReloadableServerContext, TLSConfigError
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
    "KNOWN_METHODS",
    "MAGIC_COOKIE",
    "MAX_MESSAGE_SIZE",
    "URI",
    "AuthOutcome",
    "Binding",
    "BindingPersistence",
    "CSeq",
    "CachedCredentialLookup",
    "ClientTransaction",
    "ClientTransactionUser",
    "CredentialDirectory",
    "CredentialLookup",
    "Credentials",
    "Dialog",
    "DialogId",
    "DialogTable",
    "DigestAuthenticator",
    "DigestPolicy",
    "Headers",
    "LocationService",
    "MessageSender",
    "NameAddress",
    "NonceState",
    "Peer",
    "Registrar",
    "RegistrarPolicy",
    "ReloadableServerContext",
    "Request",
    "Response",
    "SDPError",
    "SIPEndpoint",
    "SIPMessage",
    "SIPParseError",
    "SIPTransport",
    "SecurityPolicy",
    "ServerTransaction",
    "SessionDescription",
    "SourceGuard",
    "StreamFramer",
    "StreamLimits",
    "TLSConfigError",
    "TransactionManager",
    "TransactionUser",
    "TransportError",
    "Verdict",
    "Via",
    "compute_ha1",
    "make_response",
    "method_label",
    "new_branch",
    "new_tag",
    "parse",
    "sdp",
    "status_label",
]
