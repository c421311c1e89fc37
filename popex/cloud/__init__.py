"""The cloud tier: finishes the inference that an edge offloads.

:class:`popex.cloud.runner.CloudRunner` runs the remaining stages and
answers with :class:`popex.wire.OffloadReply`; its
:class:`popex.cloud.store.ModelStore` keeps the models the edge registered.
"""
