"""Redis ACL users of the data plane: defined in inferstack.contract.acl (kept as an import path)."""

from inferstack.contract.acl import *  # noqa: F401,F403
from inferstack.contract.acl import __all__  # noqa: F401
