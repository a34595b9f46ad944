"""Matrix errors: one exception type that every layer raises and the web layer serialises."""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    """An error with a Matrix ``errcode`` that becomes a JSON error response.

    ``extra`` holds additional keys of the error body (for example ``mxid`` with
    ``M_THREEPID_IN_USE`` or ``lookup_pepper`` with ``M_INVALID_PEPPER``).
    """

    def __init__(
        self,
        status: int,
        errcode: str,
        error: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"errcode": self.errcode, "error": self.error, **self.extra}


def missing_params(*names: str) -> MatrixError:
    """400 M_MISSING_PARAMS naming the missing parameters."""
    return MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: " + ", ".join(names))


def invalid_param(error: str) -> MatrixError:
    """400 M_INVALID_PARAM."""
    return MatrixError(400, "M_INVALID_PARAM", error)


def bad_json(error: str) -> MatrixError:
    """400 M_BAD_JSON: the body is JSON but of the wrong shape."""
    return MatrixError(400, "M_BAD_JSON", error)


def unauthorized(error: str = "Unrecognised access token") -> MatrixError:
    """401 M_UNAUTHORIZED."""
    return MatrixError(401, "M_UNAUTHORIZED", error)


def forbidden(error: str) -> MatrixError:
    """403 M_FORBIDDEN."""
    return MatrixError(403, "M_FORBIDDEN", error)


class StartupError(Exception):
    """A fatal start-up problem (a port in use, an unreadable TLS file); ``str()`` is one line
    naming the cause and the setting."""
