"""Slack-compatible webhook (``{"text": ...}``) on rotation success and failure.

The URL is never logged: Slack-style webhook URLs carry their token in the path.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import aiohttp

from agent.logs import event


async def post(url: str, text: str, *, rotation: str, limit: float = 10.0) -> bool:
    target = f"webhook {urlsplit(url).hostname}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit)) as session,
            session.post(url, json={"text": text}) as response,
        ):
            if response.status >= 300:
                reason = f"HTTP {response.status}"
            else:
                return True
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = type(exc).__name__
    event("notify_failed", logging.WARNING, target=target, rotation=rotation, reason=reason)
    return False
