"""Every agreement between the processes of inferstack, defined once (standard library only).

The web tier, the workers, the operator and the client import these names instead of spelling
them: Redis keys and the consumer group (``queue``), the messages that cross Redis with their
wire shape (``messages``), ports, port names and HTTP paths (``http``), and the one table of
settings read from the environment (``settings``). Nothing here imports numpy, redis or any
other package of ours, so the operator can import it without the data plane's dependencies
(``.importlinter`` keeps it so).
"""

from inferstack.contract import http, messages, queue, settings
from inferstack.contract.settings import SETTINGS, ConfigError, Setting, Settings

__all__ = ["SETTINGS", "ConfigError", "Setting", "Settings", "http", "messages", "queue", "settings"]
