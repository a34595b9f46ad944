"""Property-based fuzzing of the Identity Service API against the Matrix spec's own OpenAPI files
(schemathesis): the spec's fragments assembled into one document, and the checks run on every
response."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from schemathesis import APIOperation, BaseSchema, Case, CheckContext, CheckFunction, Response
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import status_code_conformance

REPO_ROOT = Path(__file__).resolve().parents[2]
# The spec checkout shared by everyone working on this machine (and CI, which runs here).
SPEC_ROOT = REPO_ROOT.parent / "shared" / "spec"
IDENTITY_API = SPEC_ROOT / "matrix-spec" / "data" / "api" / "identity"

Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]


class SpecError(Exception):
    """The spec's files are missing or do not assemble into one document."""


def _load_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e}") from e


def _follow_pointer(document: Any, pointer: str, where: str) -> Any:
    """The node at a JSON pointer (``/a/b``; ``""`` is the whole document)."""
    node = document
    for token in pointer.split("/")[1:] if pointer else []:
        token = token.replace("~1", "/").replace("~0", "~")
        try:
            node = node[int(token)] if isinstance(node, list) else node[token]
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise SpecError(f"{where}: no {pointer!r}") from e
    return node


class _RefInliner:
    """Replaces every ``$ref`` with a copy of what it points at, so the document stands alone.

    The spec's fragments refer to files relative to themselves (``definitions/sid.yaml``,
    ``../client-server/definitions/errors/error.yaml``, ``...#/accessTokenBearer``); a local
    ``#/...`` reference means the file it appears in. The identity API has no recursive
    schemas; a cycle is reported rather than followed.
    """

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}

    def file(self, path: Path) -> Any:
        path = path.resolve()
        if path not in self._files:
            self._files[path] = _load_yaml(path)
        return self._files[path]

    def inline(self, node: Any, path: Path, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, list):
            return [self.inline(item, path, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return {key: self.inline(value, path, seen) for key, value in node.items()}
        file_part, _, pointer = ref.partition("#")
        target_path = (path.parent / file_part).resolve() if file_part else path.resolve()
        key = f"{target_path}#{pointer}"
        if key in seen:
            raise SpecError(f"{path}: cyclic $ref {ref}")
        target = _follow_pointer(self.file(target_path), pointer, f"{path}: $ref {ref}")
        resolved = self.inline(copy.deepcopy(target), target_path, (*seen, key))
        # OpenAPI 3.1 allows keywords beside $ref (a description, mostly); they win.
        siblings = {k: self.inline(v, path, seen) for k, v in node.items() if k != "$ref"}
        if siblings and isinstance(resolved, dict):
            return {**resolved, **siblings}
        return resolved


def identity_api_document(directory: Path = IDENTITY_API) -> dict[str, Any]:
    """One OpenAPI 3.1 document made of every ``*.yaml`` fragment in ``directory``.

    Each fragment serves its paths under its own ``basePath`` (``/_matrix/identity`` for
    ``/versions`` and ``/v2``, ``/_matrix/identity/v2`` for the rest): the merged paths are
    absolute, so the server is just the base URL. References are inlined.
    """
    if not directory.is_dir():
        raise SpecError(
            f"the Matrix spec's identity API is not at {directory} "
            f"(the test reads it from ../shared/spec relative to the repository)"
        )
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise SpecError(f"no *.yaml files in {directory}")
    inliner = _RefInliner()
    paths: dict[str, dict[str, Any]] = {}
    security_schemes: dict[str, Any] = {}
    for path in files:
        fragment = inliner.inline(inliner.file(path), path)
        try:
            base = fragment["servers"][0]["variables"]["basePath"]["default"]
        except (KeyError, IndexError, TypeError) as e:
            raise SpecError(f"{path}: no servers[0].variables.basePath.default") from e
        for suffix, item in fragment.get("paths", {}).items():
            merged = paths.setdefault(base.rstrip("/") + suffix, {})
            for method, operation in item.items():
                if method in merged:
                    raise SpecError(f"{path}: {method.upper()} {base}{suffix} defined twice")
                merged[method] = operation
        components = fragment.get("components", {})
        for name, scheme in components.get("securitySchemes", {}).items():
            if security_schemes.setdefault(name, scheme) != scheme:
                raise SpecError(f"{path}: security scheme {name} differs between fragments")
    return {
        "openapi": "3.1.0",
        "info": {"title": "Matrix Identity Service API (assembled)", "version": "2"},
        "paths": paths,
        "components": {"securitySchemes": security_schemes},
    }


def spec_operations(schema: BaseSchema) -> list[Operation]:
    """Every operation of the loaded document (SpecError naming one that does not load)."""
    operations = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise SpecError(f"an operation of the assembled spec does not load: {result.err()}")
        operations.append(result.ok())
    return operations


# Rules the spec states in prose (descriptions, "3PID validation sessions") but not as schema
# keywords: client secrets and session IDs are 1 to 255 of [0-9a-zA-Z.=_-], as is the token
# store-invite returns; a country is two upper-case letters. Written into the schemas, they let
# positive cases get past the first check, negative cases break them, and responses be held to
# them.
OPAQUE_ID = "^[0-9a-zA-Z.=_-]{1,255}$"
PROSE_PATTERNS = {"client_secret": OPAQUE_ID, "sid": OPAQUE_ID, "country": "^[A-Z]{2}$"}
STORE_INVITE = "/_matrix/identity/v2/store-invite"


def _add_pattern(schema: Any, name: str) -> None:
    if isinstance(schema, dict) and schema.get("type") == "string" and name in PROSE_PATTERNS:
        schema.setdefault("pattern", PROSE_PATTERNS[name])


def _tighten(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    for name, schema in (node.get("properties") or {}).items():
        _add_pattern(schema, name)
    if node.get("in") in ("query", "path"):
        _add_pattern(node.get("schema"), node.get("name", ""))
    for value in node.values():
        _tighten(value)


def with_prose_rules(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with ``PROSE_PATTERNS`` written into its schemas."""
    document = copy.deepcopy(document)
    _tighten(document["paths"])
    answer = document["paths"][STORE_INVITE]["post"]["responses"]["200"]["content"]
    answer["application/json"]["schema"]["properties"]["token"]["pattern"] = OPAQUE_ID
    return document


# --- Checks ----------------------------------------------------------------------------------

# 400 errcodes saying the request itself is malformed. The spec's "standard error response"
# applies to every endpoint, but its OpenAPI files list 400 only where an endpoint has its own
# 400 errcodes (register, logout, hash_details, terms, pubkey/isvalid... list none). Only these
# codes are accepted on an operation that does not document 400.
MALFORMED_REQUEST_ERRCODES = frozenset(
    {"M_NOT_JSON", "M_BAD_JSON", "M_MISSING_PARAMS", "M_INVALID_PARAM"}
)

REGISTER = "POST /_matrix/identity/v2/account/register"
NO_VALID_SESSION = {404: frozenset({"M_NO_VALID_SESSION"})}

# Statuses the OpenAPI files leave out of one operation, with the only errcodes accepted.
UNDOCUMENTED_ERRORS: dict[str, dict[int, frozenset[str]]] = {
    # register documents no error at all. A homeserver that does not vouch for the OpenID token
    # is 401 (M_UNKNOWN_TOKEN is what the homeserver says; M_UNAUTHORIZED is the IS's own
    # code); a homeserver outside accounts.allowed_homeservers is 403 M_FORBIDDEN (the fuzz
    # sets that list so that random server names never make the server go out to the network).
    REGISTER: {
        401: frozenset({"M_UNKNOWN_TOKEN", "M_UNAUTHORIZED"}),
        403: frozenset({"M_FORBIDDEN"}),
    },
    # No session for that sid and client_secret: 404 M_NO_VALID_SESSION, as the spec documents
    # it for the same condition on getValidated3pid and bind; submitToken's YAML lists only
    # 400 codes about a session that exists (wrong token, expired).
    "POST /_matrix/identity/v2/validate/email/submitToken": NO_VALID_SESSION,
    "POST /_matrix/identity/v2/validate/msisdn/submitToken": NO_VALID_SESSION,
}

# The operations this server rate-limits (register per IP, requestToken per address and IP,
# store-invite per sender, address and IP). No Identity Service endpoint documents 429; the
# Client-Server convention (429 M_LIMIT_EXCEEDED with Retry-After) is what clients and
# homeservers understand.
RATE_LIMITED_OPERATIONS = frozenset(
    {
        REGISTER,
        "POST /_matrix/identity/v2/validate/email/requestToken",
        "POST /_matrix/identity/v2/validate/msisdn/requestToken",
        "POST /_matrix/identity/v2/store-invite",
    }
)


def _json_body(response: Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _is_json(response: Response) -> bool:
    content_type = response.headers.get("content-type", [""])[0]
    return content_type.split(";")[0].strip().lower() == "application/json"


def matrix_error_body(ctx: CheckContext, response: Response, case: AnyCase) -> None:
    """Every JSON 4xx is a standard Matrix error: ``errcode`` and ``error``, both strings (the
    spec's error schema requires only ``errcode``; its prose requires both)."""
    del ctx
    if not 400 <= response.status_code < 500 or not _is_json(response):
        return
    body = _json_body(response)
    assert isinstance(body, dict), f"{case.operation.label}: error body is not an object: {body!r}"
    assert isinstance(body.get("errcode"), str) and isinstance(body.get("error"), str), (
        f"{case.operation.label}: {response.status_code} without errcode and error: {body!r}"
    )


def status_code_conformance_with_spec_prose(valid_authorization: str) -> CheckFunction:
    """A check: the status is one the operation documents, or one the spec's prose gives it.

    ``valid_authorization`` is the ``Authorization`` header of a registered user who accepted
    the terms; a request that carried it must not be refused for want of credentials.
    """

    def status_code_conformance_with_spec_prose(
        ctx: CheckContext, response: Response, case: AnyCase
    ) -> None:
        status = response.status_code
        operation = case.operation
        if operation.responses.find_by_status_code(status) is None:
            label = f"{operation.method.upper()} {operation.path}"
            body = _json_body(response) if _is_json(response) else None
            errcode = body.get("errcode") if isinstance(body, dict) else None
            if status == 400 and errcode in MALFORMED_REQUEST_ERRCODES:
                return
            # "Authentication": missing or invalid credentials on an endpoint that needs them
            # are 401 M_UNAUTHORIZED, which the OpenAPI files leave out (all but logout's). The
            # fuzz leaves the header out or spoils it now and then, on purpose.
            if (
                status == 401
                and operation.definition.raw.get("security")
                and response.request.headers.get("Authorization") != valid_authorization
            ):
                assert errcode == "M_UNAUTHORIZED", f"{label}: 401 with {body!r}"
                return
            if status in UNDOCUMENTED_ERRORS.get(label, {}):
                allowed = UNDOCUMENTED_ERRORS[label][status]
                assert errcode in allowed, f"{label}: {status} with {body!r}"
                return
            if status == 429 and label in RATE_LIMITED_OPERATIONS:
                assert errcode == "M_LIMIT_EXCEEDED", f"{label}: 429 with {body!r}"
                assert "retry-after" in response.headers, f"{label}: 429 without Retry-After"
                return
        status_code_conformance(ctx, response, case)

    return status_code_conformance_with_spec_prose
