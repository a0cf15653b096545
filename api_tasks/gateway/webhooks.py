"""``GET /v1/webhooks/deliveries``: the caller's webhook deliveries and how each went."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api_tasks.gateway.listing import limit, listed, page_response
from api_tasks.record.store import OwnerIndex
from api_tasks.record.webhooks import WebhookRecords, delivery_object

__all__ = ["list_deliveries"]


async def list_deliveries(request: Request) -> Response:
    """``GET /v1/webhooks/deliveries?after=&limit=``: newest first, each with its status,
    attempts and last error."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    count = limit(request, 20, 100)
    index = OwnerIndex.sorted_set(key.name, gateway.keys.owned_webhooks(key.name),
                                  WebhookRecords(gateway.keys).state)
    deliveries, more = await listed(request, gateway.store.shell, index, "delivery", count)
    return page_response([delivery_object(delivery_id, state, gateway.settings)
                          for delivery_id, state in deliveries], more)
