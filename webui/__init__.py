"""The IPMI tab: the REST API and web UI for fencing settings, host states and fence history.

Operator changes go to the compacted settings topic (`streams.settings_store`), never to a local
file, so every worker sees them; everything shown is read back from fencer's topics.
"""
