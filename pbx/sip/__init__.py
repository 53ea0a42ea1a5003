"""The SIP stack: sans-IO codec, transactions, transport and the endpoint on top.

This is the package's public face; other packages import only from here.
"""

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
    "CSeq",
    "ClientTransaction",
    "ClientTransactionUser",
    "Headers",
    "MessageSender",
    "NameAddress",
    "Peer",
    "Request",
    "Response",
    "SIPEndpoint",
    "SIPMessage",
    "SIPParseError",
    "SIPTransport",
    "ServerTransaction",
    "StreamFramer",
    "TransactionManager",
    "TransactionUser",
    "TransportError",
    "Via",
    "make_response",
    "new_branch",
    "parse",
]
