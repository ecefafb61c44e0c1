"""Protocol limits and versions: every bound the decoder checks lives here.

Limits are checked before anything is allocated or written: a frame header
that claims more than these is refused before its body is read.
"""

from __future__ import annotations

#: Magic bytes opening every frame.
MAGIC = b"FRRY"

#: The first version with compressed page and disk batches (RangeBatch.compressed, the `compress`
#: migration parameter): the one place that names its number.
COMPRESSION_VERSION = 5
#: The first version with several data streams per migration (the `streams` migration parameter,
#: StreamAttach): the one place that names its number.
STREAMS_VERSION = 6
#: The protocol version this code speaks natively.
CURRENT_VERSION = STREAMS_VERSION
#: The oldest version accepted (0 is "none"): a peer speaking it migrates what it can describe.
MIN_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset(range(MIN_VERSION, CURRENT_VERSION + 1))

#: Most data streams (connections) one migration uses, its main connection included.
MAX_STREAMS = 8

#: Most block PCs one CodeHint names, and most code bytes it carries.
MAX_HINT_PCS = 4096
MAX_HINT_CODE = 64 * 1024

#: Guest page size; every page range is aligned to it.
PAGE_SIZE = 4096

#: Largest msgpack body of one frame (page range lists, device state, ...).
MAX_BODY_SIZE = 4 * 1024 * 1024
#: Largest body of a handshake message, and of any frame read before authentication.
MAX_HANDSHAKE_BODY = 4096
#: Largest raw payload behind one frame (page data of one batch), and largest a compressed
#: payload may inflate to: a batch's ranges declare its size, checked against this before any byte.
MAX_PAYLOAD_SIZE = 64 * 1024 * 1024
#: Most data ranges in one page batch.
MAX_RANGES = 16384
#: Most zero ranges (no payload) in one page batch.
MAX_ZERO_RANGES = 16384
#: Largest guest the protocol describes (used when the guest size is not known yet).
MAX_GUEST_SIZE = 1 << 40
#: Largest disk image a DiskBatch addresses.
MAX_DISK_SIZE = 1 << 50
#: Longest VM / agent name.
MAX_NAME_LEN = 255
#: Authentication nonce length (bytes); a peer's nonce must be exactly this long.
NONCE_SIZE = 32
#: HMAC-SHA256 digest length.
MAC_SIZE = 32
