"""Small shared helpers (atomic file writes), and the original public API's two names.

`from simplified_slm.utils import ByteTokenizer, RecurrentCache` is how the MatMul-free
reference API spelled them; both classes now live where they belong (`tokenizers/byte.py`,
`layers/recurrent_cache.py`) and are re-exported here so that code keeps working.
"""

from simplified_slm.layers.recurrent_cache import RecurrentCache
from simplified_slm.tokenizers.byte import ByteTokenizer

__all__ = ["ByteTokenizer", "RecurrentCache"]
