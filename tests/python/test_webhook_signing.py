"""edgeroute-jobs' Standard Webhooks signatures checked by an independent implementation: the
PyPI `standardwebhooks` package verifies what we sign (one secret, and two during a rotation),
and we verify what it signs. The signer is the crate's `webhook_sign` example, from
$EDGEROUTE_WEBHOOK_SIGN_BIN (scripts/test.sh builds it)."""

import base64
import datetime
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ROOT = Path(__file__).resolve().parents[2]


def signer() -> str:
    path = os.environ.get("EDGEROUTE_WEBHOOK_SIGN_BIN") or str(
        ROOT / "target" / "debug" / "examples" / "webhook_sign"
    )
    if not os.path.exists(path):
        pytest.fail(
            f"{path} missing: cargo build -p edgeroute-jobs --example webhook_sign "
            "(scripts/test.sh does) or set EDGEROUTE_WEBHOOK_SIGN_BIN"
        )
    return path


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def run(args: list[str], body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [signer(), *args], input=body.encode(), capture_output=True, timeout=30
    )


BODY = json.dumps({"type": "batch.completed", "data": {"id": "batch_1", "status": "completed"}})


def test_standardwebhooks_verifies_what_we_sign():
    secret = new_secret()
    ts = str(int(time.time()))
    out = run(["sign", "--secret", secret, "--id", "msg_1", "--timestamp", ts], BODY)
    assert out.returncode == 0, out.stderr
    headers = json.loads(out.stdout)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert Webhook(secret).verify(BODY, headers)["data"]["id"] == "batch_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("batch_1", "batch_2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_during_a_rotation_either_secret_verifies_with_standardwebhooks():
    old, new = new_secret(), new_secret()
    ts = str(int(time.time()))
    args = ["sign", "--secret", old, "--secret", new, "--id", "msg_2", "--timestamp", ts]
    out = run(args, BODY)
    assert out.returncode == 0, out.stderr
    headers = json.loads(out.stdout)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)


def test_we_verify_what_standardwebhooks_signs_and_refuse_a_tampered_body():
    secret = new_secret()
    ts = int(time.time())
    at = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    signature = Webhook(secret).sign("msg_3", at, BODY)
    common = ["--secret", secret, "--id", "msg_3", "--timestamp", str(ts)]
    ok = run(["verify", *common, "--signature", signature, "--now", str(ts + 299)], BODY)
    assert ok.returncode == 0, ok.stderr
    tampered = run(["verify", *common, "--signature", signature, "--now", str(ts)], BODY + " ")
    assert tampered.returncode == 1
    assert b"no webhook-signature matches" in tampered.stderr
    late = run(["verify", *common, "--signature", signature, "--now", str(ts + 301)], BODY)
    assert late.returncode == 1
    assert b"tolerance" in late.stderr
