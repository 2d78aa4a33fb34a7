"""Feedback on served traffic, recorded durably: the wire schema (`request.py`), the resolved sample and the store
of one worker with its pool's peers (`store.py`), and the framed on-disk log (`log.py`).

Why apart from training: a 2xx on `/v1/feedback` is a promise kept by this package alone (the record is fsynced
before the answer), whether or not a job trains the adapter yet (`--feedback-adapter`, or feedback collected before
a job starts). Training reads it (`worker/training/`), never the other way round."""
