"""passn.openai_api: request validation, limits, auth and response bodies."""

import pytest

from passn.openai_api import (ApiError, Limits, check_bearer, completion_body, logprobs_body,
                              parse_completion_request, token_digest)

SERVED = {"ce", "dco"}


def rejected(body, limits=Limits()):
    with pytest.raises(ApiError) as info:
        parse_completion_request(body, limits, SERVED)
    return info.value


def test_a_valid_request_keeps_its_fields_and_ignores_unknown_ones():
    r = parse_completion_request({"model": "ce", "prompt": ["a", "b"], "n": 4, "temperature": 0.7, "max_tokens": 9,
                                  "logprobs": 1, "seed": 3, "stop": "\n", "user": "x"}, Limits(), SERVED)
    assert (r.prompts, r.n, r.temperature, r.max_tokens, r.logprobs, r.seed, r.stops) == \
        (["a", "b"], 4, 0.7, 9, 1, 3, ["\n"])


@pytest.mark.parametrize("body, status, param", [
    ({"model": "ce", "prompt": "a", "n": 0}, 400, "n"),
    ({"model": "ce", "prompt": "a", "n": 257}, 400, "n"),
    ({"model": "ce", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "ce", "prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "ce", "prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ({"model": "ce", "prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ({"model": "ce", "prompt": "a", "temperature": 0, "n": 2}, 400, "n"),
    ({"model": "ce", "prompt": "a", "stream": True}, 400, "stream"),
    ({"model": "ce", "prompt": []}, 400, "prompt"),
    ({"model": "ce", "prompt": ["a"] * 65}, 400, "prompt"),
    ({"model": "ce"}, 400, "prompt"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "/etc/passwd", "prompt": "a"}, 404, "model"),
])
def test_rejections_name_the_field(body, status, param):
    error = rejected(body)
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["param"] == param and error.message.startswith(param)


def test_bearer_tokens_are_compared_by_digest():
    digest = token_digest("s3cret")
    check_bearer("Bearer s3cret", digest)
    check_bearer(None, None)  # a server without authentication
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong"):
        with pytest.raises(ApiError) as info:
            check_bearer(header, digest)
        assert info.value.status == 401


def test_completion_body_counts_usage_and_offsets():
    choices = [{"text": "ab", "finish_reason": "stop", "logprobs": logprobs_body(["a", "b"], [-0.1, -0.2], None),
                "num_tokens": 3}, {"text": "c", "finish_reason": "length", "logprobs": None, "num_tokens": 1}]
    body = completion_body("cmpl-1", "ce", choices, prompt_tokens=5)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["logprobs"]["text_offset"] == [0, 1]
