"""(for :mod:`popex.edge.fake_cloud`) The fake cloud's batched offloads, kept apart to keep that module small.

:class:`BatchOffloads` is mixed into :class:`~popex.edge.fake_cloud.FakeCloud`;
it uses the fake's ``_receive``, ``runner``, scripted answer and times.
"""

from __future__ import annotations

from typing import Any

from popex.edge.cloud_types import CloudBatchInference, CloudRejected
from popex.errors import PopexError
from popex.runtime.batcher import MAX_BATCH_SIZE
from popex.wire import OffloadReply, replies_from_dict

__all__ = ["BatchOffloads"]


class BatchOffloads:
    """``infer_batch`` of the cloud port, for :class:`~popex.edge.fake_cloud.FakeCloud`."""

    runner: Any
    label: int
    class_name: str
    confidence: float
    cloud_ms: float | None
    transfer_ms: float

    def infer_batch(self, payload: bytes, *, request_ids: tuple[str, ...], timeout_s: float,
                    content_encoding: str | None = None) -> CloudBatchInference:
        """Finish a batched offload: scripted (each sample the scripted answer) or by the real cloud half.

        Parameters
        ----------
        payload, request_ids, timeout_s, content_encoding
            As :meth:`popex.edge.cloud_port.CloudPort.infer_batch`.

        Returns
        -------
        CloudBatchInference
            Raises as :meth:`infer`.
        """
        request, link_ms = self._receive("infer_batch", payload, timeout_s, content_encoding)
        if self.runner is not None:
            try:
                replies = self.runner.infer_batch_payload(payload, content_encoding=content_encoding,
                                                          max_batch_size=MAX_BATCH_SIZE)
            except PopexError as err:
                raise CloudRejected(err.http_status, err.code, str(err)) from err
        else:
            replies = [OffloadReply(self.label, self.class_name, self.confidence, 1.0, request_id, request.model_id)
                       for request_id in request.request_ids or ()]
        cloud_ms = max(reply.cloud_ms for reply in replies) if self.cloud_ms is None else self.cloud_ms
        transfer_ms = link_ms + self.transfer_ms
        return CloudBatchInference(replies=tuple(replies_from_dict({"results": [r.to_dict() for r in replies]},
                                                                   request_ids=request_ids)),
                                   cloud_ms=cloud_ms, transfer_ms=transfer_ms, round_trip_ms=cloud_ms + transfer_ms,
                                   n_bytes=len(payload))
