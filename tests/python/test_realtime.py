"""The official `openai` client's realtime connection (`client.beta.realtime.connect`, OpenAI's
realtime event protocol over a WebSocket) against a node, and through `edgeroute proxy` while
the fleet changes under the session: the serving node drained, then the next one killed —
every turn answered, the conversation carried over (issue 19)."""

import asyncio
import base64
import json
import re
import struct

import httpx
import openai

SIM = (
    '[backend]\nkind = "sim"\n[backend.sim]\nseed = 7\ntokens_per_s = 400.0\n'
    '[[backend.sim.gpus]]\nid = "gpu0"\nslots = 4\n'
    '[[backend.sim.models]]\nid = "sim-realtime"\ngpu = "gpu0"\n'
)


async def until(conn, kind):
    """Events until one of type `kind` (included), as dicts."""
    seen = []
    while True:
        ev = json.loads(await asyncio.wait_for(conn.recv_bytes(), 20))
        seen.append(ev)
        if ev["type"] == kind:
            return seen


async def text_turn(conn, words):
    await conn.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": words}]}})
    await conn.send({"type": "response.create"})
    events = await until(conn, "response.done")
    done = events[-1]["response"]
    assert done["status"] == "completed", done
    assert not [e for e in events if e["type"] in ("error", "edgeroute.migrate")], events
    audio = b"".join(base64.b64decode(e["delta"]) for e in events
                     if e["type"] == "response.audio.delta")
    assert len(audio) > 0 and len(audio) % 2 == 0, "PCM16 audio came back"
    return done["output"][0]["content"][0]["transcript"]


def rt_client(base, key):
    ws = base.replace("http://", "ws://", 1)
    return openai.AsyncOpenAI(base_url=f"{base}/v1", websocket_base_url=f"{ws}/v1", api_key=key,
                              max_retries=0)


def realtime_served(base):
    """Realtime sessions a node opened, from its /metrics (0 for a dead node)."""
    try:
        m = httpx.get(f"{base}/metrics").text
    except httpx.ConnectError:
        return 0
    found = re.search(r'edgeroute_node_requests_total\{route="realtime",status="101"\} (\d+)', m)
    return int(found.group(1)) if found else 0


def test_the_official_client_holds_a_realtime_session_on_a_node(start_node):
    base, mint, _ = start_node(SIM)

    async def run():
        client = rt_client(base, mint())
        async with client.beta.realtime.connect(model="sim-realtime") as conn:
            created = await until(conn, "session.created")
            assert created[0]["session"]["model"] == "sim-realtime"
            await conn.send({"type": "session.update", "session": {"voice": "verse"}})
            assert (await until(conn, "session.updated"))[-1]["session"]["voice"] == "verse"
            # Spoken input: two seconds of 24 kHz PCM16, appended in pieces, committed.
            pcm = struct.pack("<48000h", *((i * 31) % 3000 - 1500 for i in range(48000)))
            for i in range(0, len(pcm), 19200):
                await conn.send({"type": "input_audio_buffer.append",
                                 "audio": base64.b64encode(pcm[i:i + 19200]).decode()})
            await conn.send({"type": "input_audio_buffer.commit"})
            heard = await until(conn, "conversation.item.input_audio_transcription.completed")
            assert heard[-1]["transcript"].strip()
            await conn.send({"type": "response.create"})
            events = await until(conn, "response.done")
            kinds = {e["type"] for e in events}
            assert {"response.audio.delta", "response.audio_transcript.delta"} <= kinds
            said = await text_turn(conn, "And in Montreal?")
            assert said.strip()
        # A caller without a token is refused at the upgrade.
        bad = rt_client(base, "not-a-jwt")
        try:
            async with bad.beta.realtime.connect(model="sim-realtime") as conn:
                await conn.recv()
            raise AssertionError("a forged token opened a session")
        except Exception as e:  # websockets' InvalidStatus: HTTP 401
            assert "401" in str(e), e

    asyncio.run(run())
    m = httpx.get(f"{base}/metrics").text
    assert 'edgeroute_node_first_byte_seconds_count{route="realtime"} 2' in m


def test_through_the_proxy_a_realtime_session_outlives_a_drain_and_a_dead_node(
        start_node, start_discovery_and_proxy):
    """Three nodes behind discovery and the proxy. The node holding the session is drained
    between turns (the session moves with its conversation), then the next one is killed
    (the session moves again): every turn is answered, on the node the session moved to."""
    nodes = {}
    for nid in ("tor-1", "tor-2", "tor-3"):
        base, mint, proc = start_node(SIM, node_id=nid, region="toronto")
        nodes[nid] = (base, proc)
    proxy = start_discovery_and_proxy([(n, b, "toronto") for n, (b, _) in nodes.items()],
                                      "sim-realtime", mint())
    admin = mint(scope="admin")

    def serving():
        return {n for n, (b, _) in nodes.items() if realtime_served(b) > opened[n]}

    opened = {n: 0 for n in nodes}

    async def run():
        client = rt_client(proxy, "unused")
        async with client.beta.realtime.connect(model="sim-realtime") as conn:
            await until(conn, "session.created")
            first = await text_turn(conn, "Book a table for two.")
            assert first.strip()
            [a] = serving()
            opened[a] = realtime_served(nodes[a][0])
            r = httpx.post(f"{nodes[a][0]}/admin/drain", json={"deadline_ms": 20000},
                           headers={"authorization": f"Bearer {admin}"})
            assert r.status_code in (200, 202), r.text
            # The hint arrives within a tick; the session moves between turns.
            for _ in range(100):
                if serving():
                    break
                await asyncio.sleep(0.05)
            [b] = serving()
            assert b != a
            second = await text_turn(conn, "At eight, please.")
            assert second.strip()
            opened[b] = realtime_served(nodes[b][0])
            nodes[b][1].p.kill()
            third = await text_turn(conn, "Near the window.")
            assert third.strip()
            [c] = serving()
            assert c not in (a, b)
            return first, second, third

    turns = asyncio.run(run())
    assert len(turns) == 3
