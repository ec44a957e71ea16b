"""groundgan from Python, without the command line (a composition root, as cli.py is):

    from pipeline.api import load_student
    s = load_student("runs/demo")                  # a run directory, a `groundgan export` folder or a final/
    s.generate(["a.wav", "b.jpg"])                 # [{key, modality, text, avg_logprob, fallback}, ...]
    s.transcribe([samples_16k], modality="audio")  # decoded inputs: 16 kHz float32 arrays
    import pipeline; pipeline.load_student(...)    # the same function

Inputs are decoded, featurised by their modality's teacher (built once) and decoded in batches with the run's
decoding settings: the evaluate stage's texts for the same inputs (docs/export.md).
"""

from stages.models.batch import Item, LoadedStudent, decode_seed, load_student, read_inputs

__all__ = ["Item", "LoadedStudent", "decode_seed", "load_student", "read_inputs"]
