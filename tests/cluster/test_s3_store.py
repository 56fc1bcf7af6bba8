"""Images in an S3-compatible bucket (a real S3 API server: moto's server mode): any replica serves an
image another one made, edits read their inputs from the bucket, a presigned redirect when asked,
and an object deleted behind Kiln's back is a clear 410 — from a bucket or a directory — never a 500."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from engine_server import engine_settings

from kiln.service import jobs

postgres_only = pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free port for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str):  # type: ignore[no-untyped-def]
    """A fresh bucket: (boto3 client, bucket name, the settings that point Kiln at it)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test")
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket, {
        "image_store": f"s3://{bucket}/images", "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1",
        "s3_access_key_id": "kiln-test", "s3_secret_access_key": "kiln-test", "s3_allow_http": True,
    }


def _gone(response: httpx.Response) -> None:
    assert response.status_code == 410, response.text
    error = response.json()["error"]
    assert error["code"] == "image_gone" and error["type"] == "invalid_request_error"
    assert "no longer in the image store" in error["message"]


@postgres_only
def test_any_replica_serves_an_image_another_made_and_a_lost_object_is_gone(
    start_server, settings, tmp_path, make_user, db, s3
) -> None:
    client, bucket, store = s3
    base = engine_settings(settings, tmp_path, steps=2)
    # Two replicas, each with a scheduler of its own and a different local disk: only the bucket is shared.
    maker = start_server(base.model_copy(update={**store, "images_dir": tmp_path / "a", "image_redirect_s": 60}))
    other = start_server(base.model_copy(update={**store, "images_dir": tmp_path / "b"}))
    ann = make_user(plan="plus")
    with maker.client(ann.key) as made, other.client(ann.key) as http:
        result = made.post("/v1/images/generations", json={"prompt": "a kiln", "response_format": "url"})
        assert result.status_code == 200, result.text
        image_id = result.json()["data"][0]["id"]
        image = jobs.get_image(db, image_id, ann.user_id)
        key = f"images/{image.path}"
        stored = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert stored[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "a").exists()

        streamed = http.get(f"/v1/images/{image_id}/content")  # the other replica streams it
        assert streamed.status_code == 200 and streamed.content == stored
        assert streamed.headers["content-type"] == "image/png"
        assert streamed.headers["content-length"] == str(len(stored))
        info = http.get(f"/v1/images/{image_id}").json()
        assert info["provenance"]["image_id"] == image_id and info["size_bytes"] == len(stored)

        redirect = made.get(f"/v1/images/{image_id}/content")  # image_redirect_s: a presigned URL
        assert redirect.status_code == 307
        assert httpx.get(redirect.headers["location"]).content == stored  # no Kiln key needed there

        edit = http.post("/v1/jobs", json={"prompt": "glazed", "image_id": image_id})  # inputs via the bucket
        assert edit.status_code == 202, edit.text
        outcome = other.call(other.state.runner.wait(edit.json()["id"], 60), 90)
        assert outcome.status == "succeeded"
        assert http.get(f"/v1/images/{outcome.image_ids[0]}/content").status_code == 200

        someone = make_user()
        with other.client(someone.key) as stranger:
            assert stranger.get(f"/v1/images/{image_id}/content").status_code == 404

        client.delete_object(Bucket=bucket, Key=key)  # behind Kiln's back
        _gone(http.get(f"/v1/images/{image_id}/content"))
        _gone(made.get(f"/v1/images/{image_id}/content"))  # no redirect to nothing either
        _gone(http.get(f"/v1/images/{image_id}"))


@sqlite_only
def test_a_file_lost_from_a_directory_store_is_gone_not_a_server_error(
    start_server, settings, tmp_path, make_user, db
) -> None:
    server = start_server(engine_settings(settings, tmp_path, steps=2))
    ann = make_user()
    with server.client(ann.key) as http:
        image_id = http.post("/v1/images/generations", json={"prompt": "a pot"}).json()["data"][0]["id"]
        assert http.get(f"/v1/images/{image_id}/content").status_code == 200
        (settings.images_dir / jobs.get_image(db, image_id, ann.user_id).path).unlink()
        _gone(http.get(f"/v1/images/{image_id}/content"))
        _gone(http.get(f"/v1/images/{image_id}"))
