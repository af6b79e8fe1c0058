"""simplified_slm: small language models you can build, train, evaluate and ship."""

__version__ = "0.1.0"

from simplified_slm.errors import SLMError

__all__ = ["SLMError", "__version__"]
