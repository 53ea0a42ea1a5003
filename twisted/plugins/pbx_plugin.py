"""``twistd pbx``: the PBX as a twistd plugin (``twistd -n pbx --config FILE``)."""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "configuration file (default: $PBX_CONFIG, else ./config.yml)"],
    ]


@implementer(IServiceMaker, IPlugin)
class PBXServiceMaker:
    tapname = "pbx"
    description = "A declarative state-machine PBX (SIP registrar, B2BUA, RTP relay)."
    options = Options

    def makeService(self, options: Options) -> IService:
        # twistd has installed its reactor; switch it to monotonic scheduling before
        # anything is built (build_service does it too: one function, idempotent).
        from pbx.clock import install_monotonic_clock

        install_monotonic_clock()
        from pbx.runner import build_service

        return build_service(options["config"])


serviceMaker = PBXServiceMaker()
