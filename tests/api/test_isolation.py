"""Anything that is not yours is a 404 — never a 403 — and a revoked key fails at once where it was
revoked and within a second in every other process."""

from __future__ import annotations

import time

from kiln.service.accounts import revoke_key


def test_other_users_images_jobs_and_keys_are_not_found(server, make_user) -> None:
    ann, bob = make_user("ann"), make_user("bob")
    with server.client(ann.key) as http:
        made = http.post("/v1/images/generations", json={"prompt": "a cat", "response_format": "url"}).json()
    image_id, job_id = made["data"][0]["id"], made["id"]
    with server.client(bob.key) as http:
        for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/content", f"/v1/jobs/{job_id}",
                     "/v1/images/img_doesnotexist", "/v1/jobs/job_doesnotexist"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert http.delete(f"/v1/keys/{ann.key[:14]}").status_code == 404
        assert http.get("/v1/jobs").json()["data"] == []
        assert [k["prefix"] for k in http.get("/v1/keys").json()] == [bob.key[:14]]
    with server.client(ann.key) as http:
        assert http.get(made["data"][0]["url"]).status_code == 200  # ann's key still works
        assert http.get(f"/v1/jobs/{job_id}").json()["image_ids"] == [image_id]


def test_a_key_revoked_elsewhere_is_refused_within_a_second(server, make_user, db) -> None:
    ann = make_user("ann")
    with server.client(ann.key) as http:
        assert http.get("/v1/usage").status_code == 200  # the key is in this process's cache now
        revoke_key(db, ann.key[:14])  # as `kiln keys revoke` or another API process does it
        revoked = time.monotonic()
        while (refused := http.get("/v1/usage")).status_code == 200:
            assert time.monotonic() - revoked < 1.0, "the revocation did not arrive within 1 s"
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    spare = make_user("bob")
    with server.client(spare.key) as http:  # a key may revoke itself; refused from the next request on
        assert http.get("/v1/usage").status_code == 200
        assert http.delete(f"/v1/keys/{spare.key[:14]}").json()["revoked"] is not None
        assert http.get("/v1/usage").status_code == 401
    with server.client() as anonymous:
        assert anonymous.get("/v1/usage").status_code == 401
        assert anonymous.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
