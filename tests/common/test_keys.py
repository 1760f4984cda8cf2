"""Redis keys and queue names."""

from __future__ import annotations

from lorafleet.common.schema import keys


def test_queue_names_are_one_per_model_key():
    names = ["my model", "my_model", "my/model", "my:model", "a\x00b", "a_b", "sd15"]
    queues = [keys.queue(name) for name in names]
    assert len(set(queues)) == len(names)
    assert keys.queue("sd15") == "lorafleet.model.sd15"  # a plain name keeps its queue
    assert all(keys._UNSAFE_IN_QUEUE.search(q.removeprefix(keys.QUEUE_PREFIX)) is None for q in queues)
