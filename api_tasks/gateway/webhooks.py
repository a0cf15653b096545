"""``GET /v1/webhooks/deliveries``: the caller's webhook deliveries and how each went."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api_tasks.gateway.listing import limit, page, page_response
from api_tasks.record.store import OwnerIndex, owned_page
from api_tasks.record.webhooks import WebhookRecords, delivery_object

__all__ = ["list_deliveries"]


async def list_deliveries(request: Request) -> Response:
    """``GET /v1/webhooks/deliveries?after=&limit=``: newest first, each with its status,
    attempts and last error."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    count = limit(request, 20, 100)
    records = WebhookRecords(gateway.keys)
    index = OwnerIndex(key.name, lambda start, count: records.owned(key.name, start, count),
                       records.state, lambda ids: records.forget(key.name, ids))
    after = request.query_params.get("after") or None
    deliveries, more = page(await owned_page(gateway.store.shell, index, after, count), after,
                            "delivery")
    return page_response([delivery_object(delivery_id, state, gateway.settings)
                          for delivery_id, state in deliveries], more)
