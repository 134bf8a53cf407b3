"""DoGraph's own parts: the mixer (``mixer``) and what it ties together (``buffer``, ``clustering``,
``graph``, ``objectives``). Imports the contract (``dograph.mixing``) and ``dograph.step``, never
the trainer or the run layer."""
