"""An invite stored by ma1sd before the switch completes through us, with the real Synapse.

The room holds the ``m.room.third_party_invite`` Synapse built from ma1sd's store-invite answer
(ma1sd's long-term key and the invite's ephemeral key, ``key_validity_url`` on ma1sd's v1 paths
under the public address that is now ours); ma1sd's store and key files are imported while our
server is stopped; the invitee then binds the address through our server, our onbind reaches
Synapse, which checks the signature and the keys' validity with us, and the invitee is invited.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from appservice import cli
from appservice.config import load_config
from tests.e2e.conftest import (
    AppserviceSetup,
    base_identity_settings,
    running_identity_server,
)
from tests.e2e.flows import (
    bind_through_synapse,
    register_everywhere,
    validate_email,
    wait_for_member,
)
from tests.support.ma1sd import Ma1sdKeys, create_store, make_invite, public_key
from tests.support.settings import deep_merge
from tests.support.smtp import SmtpSink
from tests.support.synapse import SynapseServer, free_port
from tests.support.tls import TestCertificates

pytestmark = pytest.mark.e2e

V1 = "/_matrix/identity/api/v1"


def _main(*args: str) -> int:
    """The command line, in process (its own thread: it runs its own event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(cli.main, list(args)).result()


async def test_invite_stored_by_ma1sd_is_delivered_by_us_and_synapse_accepts_it(
    tmp_path: Path,
    synapse: SynapseServer,
    test_certificates: TestCertificates,
    appservice_setup: AppserviceSetup,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    public_url = f"https://localhost:{port}"  # ma1sd's public address, kept by the switch

    # Before the switch: alice invited bob's address through ma1sd.
    alice, alice_hs = await synapse.register_user("alice_ma1sd", "a long test password")
    status, body = await synapse.client_request(
        "POST", "/_matrix/client/v3/createRoom", alice_hs, json={"name": "Old garden club"}
    )
    assert status == 200, body
    room_id: str = body["room_id"]
    keys = Ma1sdKeys(tmp_path / "ma1sd-keys")
    keys.new_regular(current=False)  # an older key of ma1sd, still valid there
    serial, seed = keys.new_regular()
    address = "bob.ma1sd@example.org"
    invite, e_seed = make_invite(
        keys,
        serial,
        seed,
        address=address,
        room_id=room_id,
        sender=alice,
        created_at=int(time.time() * 1000) - 86_400_000,
        room_name="Old garden club",
    )
    await create_store(str(tmp_path / "ma1sd.db"), [invite])
    server_key = {
        "public_key": public_key(seed),
        "key_validity_url": f"{public_url}{V1}/pubkey/isvalid",
    }
    ephemeral_key = {
        "public_key": public_key(e_seed),
        "key_validity_url": f"{public_url}{V1}/pubkey/ephemeral/isvalid",
    }
    # What Synapse builds from the store-invite answer: the keys, the first one also on top.
    content = {
        "display_name": address[:3] + "...",
        "public_keys": [server_key, ephemeral_key],
        "public_key": server_key["public_key"],
        "key_validity_url": server_key["key_validity_url"],
    }
    status, body = await synapse.client_request(
        "PUT",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.third_party_invite/"
        f"{quote(invite.token)}",
        alice_hs,
        json=content,
    )
    assert status == 200, body

    # The switch: ma1sd stopped, its store and keys imported, our server started.
    async with SmtpSink() as smtp:
        config_path = tmp_path / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                deep_merge(
                    base_identity_settings(
                        tmp_path, port, synapse, test_certificates, smtp, appservice_setup
                    ),
                    {"keys": {"signing_key_path": str(tmp_path / "signing.key")}},
                )
            )
        )
        capsys.readouterr()
        code = _main(
            "import", "ma1sd", "-c", str(config_path),
            "--db", str(tmp_path / "ma1sd.db"), "--keys", str(keys.path),
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        async with running_identity_server(
            load_config(config_path, environ={}), port, smtp, test_certificates
        ) as ids:
            status, body = await ids.request("GET", f"{V1}/pubkey/ed25519:{serial}")
            assert (status, body) == (200, {"public_key": public_key(seed)})

            bob, bob_hs, bob_is = await register_everywhere(synapse, ids, "bob_ma1sd")
            sid = await validate_email(ids, bob_is, address, "bobs-secret")
            started = time.monotonic()
            await bind_through_synapse(synapse, ids, bob_hs, bob_is, sid, "bobs-secret")

            member = await wait_for_member(synapse, alice_hs, room_id, bob, "invite")
            print(f"ma1sd invite: bind to invite in the room {time.monotonic() - started:.2f} s")
            signed = member["content"]["third_party_invite"]["signed"]
            assert (signed["mxid"], signed["token"]) == (bob, invite.token)
            status, body = await synapse.client_request(
                "POST", f"/_matrix/client/v3/join/{quote(room_id)}", bob_hs, json={}
            )
            assert status == 200, body
            await wait_for_member(synapse, alice_hs, room_id, bob, "join")
            # Resolved: the invite's ephemeral key no longer answers valid.
            status, body = await ids.request(
                "GET", f"{V1}/pubkey/ephemeral/isvalid?public_key={quote(public_key(e_seed))}"
            )
            assert (status, body) == (200, {"valid": False})
