"""Scale-out beside the main path: several processes (``distributed``), one block at a time
(``sequential``), and sizing a run before it starts (``memory``)."""
