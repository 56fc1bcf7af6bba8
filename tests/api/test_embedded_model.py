"""One request against the real embedded model, when it has been trained and committed."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from kiln.config import EMBEDDED_MODEL_PATH, load_settings


@pytest.mark.skipif(not (EMBEDDED_MODEL_PATH / "model_index.json").is_file(),
                    reason="the embedded model is not in src/kiln/embedded/model yet")
def test_sdk_generates_with_the_embedded_model(start_server, database_url, tmp_path, make_user) -> None:
    if "postgres" in database_url:
        pytest.skip("one backend is enough for the real model")
    settings = load_settings(database_url=database_url, images_dir=tmp_path / "images", data_dir=tmp_path)
    server = start_server(settings)
    ann = make_user()
    result = server.openai(ann.key).images.generate(model="gpt-image-1", prompt="a red circle",
                                                    quality="low", timeout=300)
    picture = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    native = server.state.registry.info(None).native_size
    assert picture.size == (native, native)
