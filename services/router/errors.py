"""Errors the router reports to clients, as gRPC status code names (HTTP maps onto them)."""

from __future__ import annotations

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
               "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "CANCELLED": 499, "INTERNAL": 500,
               "DEADLINE_EXCEEDED": 504}


class RouterError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param  # param: the request field at fault

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)
