import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: one thread is as fast as two when idle, and ten times faster when the
    cores are oversubscribed (OpenMP workers spin for a core that is not free). Package scope: the module-scoped
    reference runs and the tests compared with them must use the same thread count, or CPU reductions differ in
    the last bit. The subprocess jobs run with one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
