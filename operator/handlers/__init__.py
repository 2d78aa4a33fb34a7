"""kopf handlers: thin wrappers that translate events into calls on pure functions and the per-BaseModel fleet.

Importing this package registers every handler with kopf's default registry.
"""

from lorafleet.operator.handlers import adapter, basemodel, cljob, indexes, login, owned  # noqa: F401
