"""Self-supervised pretraining methods. One module per method, one line per method in METHODS."""

from ctssl.ssl.base import SSLMethod
from ctssl.ssl.byol import BYOL
from ctssl.ssl.genesis import Genesis
from ctssl.ssl.hssl import HSSL
from ctssl.ssl.pgl import PGL

METHODS: dict[str, type[SSLMethod]] = {
    "byol": BYOL,
    "genesis": Genesis,
    "hssl": HSSL,
    "pgl": PGL,
}
