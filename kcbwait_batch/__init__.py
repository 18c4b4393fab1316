"""kcbwait-batch: windows.kcbwait over many memory images, locally or on a Dask cluster.

Modules, one concept each:

- ``framework_runner``: run a Volatility plugin in-process on one image (rows as dicts);
- ``kernel_identity``: the kernel build and symbol-table GUID/age of an image;
- ``records``: the output schema (thread, frame and image status records, summary);
- ``tasks``: one image's task and its execution inside an analysis process;
- ``child``/``isolation``: the supervised analysis process (timeouts, crashes, recycling);
- ``local_pool``/``dask_backend``: where the tasks run (``backend`` is their interface);
- ``discovery``, ``writer``, ``progress``, ``cli``: the command line around them.
"""

__version__ = "0.1.0"
