"""The retention lab: everything around the adapters that measures what they keep.

Recipe harness (``experiment``, ``recipe_config``), training loop (``training``, ``losses``),
evaluators (``eval``), offline data (``data``), embedded default models (``models``), the
retention dial (``interpolation``) and reports (``report``, ``plots``). Install it with
``pip install corda_vl[lab]``; the core library (``corda_vl``) never imports it.
"""
