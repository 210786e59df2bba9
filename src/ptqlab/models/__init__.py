"""Model families as data (adapters), weight access, and loading.

Import each name from the submodule that defines it: :mod:`ptqlab.models.loading` (``load_model``),
:mod:`ptqlab.models.registry` (``get_adapter``, ``supported_classes``), :mod:`ptqlab.models.families`
(``ADAPTERS``), :mod:`ptqlab.models.adapter` (the adapter dataclasses), :mod:`ptqlab.models.weights`,
:mod:`ptqlab.models.heads`, :mod:`ptqlab.models.inputs`, :mod:`ptqlab.models.experts` and
:mod:`ptqlab.models.shards`. The package itself imports nothing, so ``import ptqlab.models.adapter`` does
not pull in transformers.
"""
