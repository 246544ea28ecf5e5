"""Errors the router reports to clients, as gRPC status code names (HTTP maps onto them)."""

from __future__ import annotations

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
               "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "CANCELLED": 499, "INTERNAL": 500}


class RouterError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)
