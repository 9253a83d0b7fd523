"""Integrations with Raft engines (experimental).

``d_engine_sm.integrations.pysyncobj`` runs a handler as the state machine of
a PySyncObj node (extra ``d_engine_sm[pysyncobj]``).
"""
