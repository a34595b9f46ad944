"""Discovery endpoints and the error conventions every endpoint shares."""

from __future__ import annotations

import io

import pytest

from tests.support.api_server import Api


async def test_versions_lists_spec_versions(api: Api) -> None:
    status, body = await api.request("GET", "/_matrix/identity/versions")
    assert status == 200
    assert "v1.1" in body["versions"]
    assert all(v.startswith("v1.") for v in body["versions"])


async def test_v2_status_answers_empty_object(api: Api) -> None:
    assert await api.request("GET", "/_matrix/identity/v2") == (200, {})


async def test_health_reports_database_ok(api: Api) -> None:
    assert await api.request("GET", "/health") == (
        200,
        {"status": "ok", "database": "ok", "appservice": {"enabled": False}},
    )


async def test_unknown_path_is_404_unrecognized(api: Api) -> None:
    status, body = await api.request("GET", "/_matrix/identity/v2/nope")
    assert status == 404
    assert body["errcode"] == "M_UNRECOGNIZED"
    assert body["error"]


async def test_wrong_method_is_405_unrecognized(api: Api) -> None:
    status, body = await api.request("DELETE", "/_matrix/identity/v2/terms")
    assert status == 405
    assert body["errcode"] == "M_UNRECOGNIZED"


async def test_body_not_json_is_400_not_json(api: Api) -> None:
    status, body = await api.request(
        "POST", "/_matrix/identity/v2/account/register", data=b"{not json"
    )
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")


async def test_body_with_nan_is_not_json(api: Api) -> None:
    status, body = await api.request(
        "POST", "/_matrix/identity/v2/account/register", data=b'{"expires_in": NaN}'
    )
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"expires_in": 1, "x": "\xff"}', id="invalid-utf8"),
        pytest.param(b'{"x": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="nested-5000-deep"),
        pytest.param(b'{"x": Infinity}', id="infinity"),
        pytest.param(b'{"x": 1} trailing', id="trailing-data"),
    ],
)
async def test_body_outside_json_is_400_not_json(api: Api, data: bytes) -> None:
    status, body = await api.request("POST", "/_matrix/identity/v2/account/register", data=data)
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")


async def test_body_not_an_object_is_400_bad_json(api: Api) -> None:
    status, body = await api.request("POST", "/_matrix/identity/v2/account/register", json=[1])
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


async def test_missing_field_is_400_missing_params(api: Api) -> None:
    status, body = await api.request(
        "POST", "/_matrix/identity/v2/account/register", json={"token_type": "Bearer"}
    )
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
    assert "access_token" in body["error"]


async def test_wrong_field_type_is_400_bad_json(api: Api) -> None:
    status, body = await api.request(
        "POST",
        "/_matrix/identity/v2/account/register",
        json={
            "access_token": 5,
            "token_type": "Bearer",
            "matrix_server_name": "hs.test",
            "expires_in": 1,
        },
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


async def test_oversized_body_is_413(api: Api) -> None:
    _, token = await api.register()
    big = b'{"a": "' + b"x" * (1_048_576 + 10) + b'"}'
    async with api.client.post(
        "/_matrix/identity/v2/lookup",
        data=io.BytesIO(big),
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        status, body = resp.status, await resp.json()
    assert status == 413
    assert body["errcode"] == "M_TOO_LARGE"


async def test_every_response_has_cors_headers(api: Api) -> None:
    for method, path in [
        ("GET", "/_matrix/identity/v2"),
        ("GET", "/_matrix/identity/v2/nope"),
        ("GET", "/_matrix/identity/v2/account"),
    ]:
        async with api.client.request(method, path) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
            assert resp.content_type == "application/json"


async def test_options_preflight_is_answered(api: Api) -> None:
    async with api.client.options(
        "/_matrix/identity/v2/lookup",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    ) as resp:
        assert resp.status == 200
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
