"""streamkv: run pretrained transformer LMs over unbounded token streams in constant memory."""
from .policies import POLICIES, make_policy, parse_policy_spec
from .rope import UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["POLICIES", "make_policy", "parse_policy_spec", "UnsupportedModelError", "__version__"]
