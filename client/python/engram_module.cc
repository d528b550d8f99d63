// engram._engram: libengram_client for Python (pybind11). The Python package `engram`
// (client/python/engram/__init__.py) re-exports what is here and adds connect().
//
// Buffers: rows go straight into the caller's memory. An `out` may be a numpy array, a torch
// tensor (CPU, or CUDA: then LookupToDevice on the tensor's current stream), any object with the
// buffer protocol, __cuda_array_interface__ or __dlpack__; it is checked (uint8, contiguous,
// writable, large enough) before anything is written. Every call that waits or gathers releases
// the GIL. Errors are engram.Error subclasses carrying the status code and the daemon's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engram/client.h"
#include "engram/engram_layer.h"
#include "engram/kernels/cpu_twin.h"
#include "tiering/layout/manifest.h"

namespace py = pybind11;

namespace engram::python {
namespace {

// ---- errors ------------------------------------------------------------------------------------

PyObject* g_error = nullptr;
std::map<absl::StatusCode, PyObject*>& ErrorTypes() {
  static auto* types = new std::map<absl::StatusCode, PyObject*>();
  return *types;
}

const char* CodeName(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kCancelled:
      return "CANCELLED";
    case absl::StatusCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case absl::StatusCode::kDeadlineExceeded:
      return "DEADLINE_EXCEEDED";
    case absl::StatusCode::kNotFound:
      return "NOT_FOUND";
    case absl::StatusCode::kAlreadyExists:
      return "ALREADY_EXISTS";
    case absl::StatusCode::kPermissionDenied:
      return "PERMISSION_DENIED";
    case absl::StatusCode::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case absl::StatusCode::kFailedPrecondition:
      return "FAILED_PRECONDITION";
    case absl::StatusCode::kAborted:
      return "ABORTED";
    case absl::StatusCode::kOutOfRange:
      return "OUT_OF_RANGE";
    case absl::StatusCode::kUnimplemented:
      return "UNIMPLEMENTED";
    case absl::StatusCode::kInternal:
      return "INTERNAL";
    case absl::StatusCode::kUnavailable:
      return "UNAVAILABLE";
    case absl::StatusCode::kDataLoss:
      return "DATA_LOSS";
    case absl::StatusCode::kUnauthenticated:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

// The exception instance for a status (GIL held).
py::object MakeError(const absl::Status& s) {
  auto it = ErrorTypes().find(s.code());
  PyObject* type = it != ErrorTypes().end() ? it->second : g_error;
  py::object error = py::reinterpret_borrow<py::object>(type)(std::string(s.message()));
  error.attr("code") = CodeName(s.code());
  error.attr("message") = std::string(s.message());
  return error;
}

[[noreturn]] void Raise(const absl::Status& s) {
  py::object error = MakeError(s);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  throw py::error_already_set();
}

[[noreturn]] void RaiseInvalid(const std::string& message) { Raise(absl::InvalidArgumentError(message)); }

void Check(const absl::Status& s) {
  if (!s.ok()) Raise(s);
}

// ---- buffers -----------------------------------------------------------------------------------

int TimeoutMs(const std::optional<double>& seconds) {
  if (!seconds) return 0;
  if (!(*seconds > 0) || !std::isfinite(*seconds)) RaiseInvalid("timeout must be a positive number of seconds");
  return static_cast<int>(std::min(std::ceil(*seconds * 1000.0), 2.0e9));
}

// torch.Tensor once torch has been imported (by anyone); null before. Looked up in sys.modules,
// never imported here: a program that does not use torch does not pay for it.
PyObject* TorchTensorType() {
  static PyObject* type = nullptr;  // kept for the life of the process
  if (type == nullptr) {
    PyObject* torch = PyImport_GetModule(py::str("torch").ptr());
    if (torch == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    type = PyObject_GetAttrString(torch, "Tensor");
    Py_DECREF(torch);
    if (type == nullptr) PyErr_Clear();
  }
  return type;
}

bool IsTorchTensor(const py::handle& o) {
  PyObject* type = TorchTensorType();
  return type != nullptr && PyObject_IsInstance(o.ptr(), type) == 1;
}

// torch.<name> (dtypes), cached: they are singletons.
py::handle TorchAttr(const char* name) {
  static auto* cache = new std::map<std::string, py::object>();
  auto it = cache->find(name);
  if (it == cache->end()) it = cache->emplace(name, py::module_::import("torch").attr(name)).first;
  return it->second;
}

py::module_& Numpy() {
  static auto* np = new py::module_(py::module_::import("numpy"));
  return *np;
}

// A contiguous uint32 view of indices (numpy, torch, lists), and the object that owns it.
struct Indices {
  py::array array;
  const uint32_t* data = nullptr;
  size_t count = 0;
};

Indices ResolveIndices(py::handle indices, uint32_t heads) {
  py::object obj = py::reinterpret_borrow<py::object>(indices);
  if (!py::isinstance<py::array>(obj) && IsTorchTensor(obj)) {
    if (obj.attr("is_cuda").cast<bool>()) obj = obj.attr("cpu")();
    obj = obj.attr("numpy")();
  }
  py::array a = py::isinstance<py::array>(obj) ? py::reinterpret_borrow<py::array>(obj) : py::array::ensure(obj);
  if (!a) RaiseInvalid("indices must be an array of integers (numpy, torch, or a sequence)");
  const char kind = a.dtype().kind();
  if ((kind != 'i' && kind != 'u') || a.itemsize() != 4) {
    if (kind != 'i' && kind != 'u') {
      RaiseInvalid(absl::StrCat("indices must be integers; got dtype ", py::str(a.dtype()).cast<std::string>()));
    }
    py::object low = a.size() > 0 ? a.attr("min")() : py::int_(0);
    py::object high = a.size() > 0 ? a.attr("max")() : py::int_(0);
    if (low.cast<int64_t>() < 0 || high.cast<uint64_t>() > UINT32_MAX) {
      RaiseInvalid("indices must lie in [0, 2^32)");
    }
    a = a.attr("astype")("uint32");
  }
  if (!(a.flags() & py::array::c_style)) a = Numpy().attr("ascontiguousarray")(a);
  if (a.ndim() >= 2 && a.shape(a.ndim() - 1) != static_cast<py::ssize_t>(heads)) {
    RaiseInvalid(absl::StrCat("indices' last dimension is ", a.shape(a.ndim() - 1), "; the table has ", heads,
                              " heads per layer"));
  }
  if (a.size() == 0 || a.size() % heads != 0) {
    RaiseInvalid(absl::StrCat(a.size(), " indices: not a positive multiple of the table's ", heads, " heads"));
  }
  Indices out;
  out.data = static_cast<const uint32_t*>(a.data());
  out.count = static_cast<size_t>(a.size());
  out.array = std::move(a);
  return out;
}

// Where rows go: host memory (numpy, CPU torch, buffer protocol) or device memory.
struct Out {
  py::object keep;    // the object that owns the memory (kept alive during the call)
  py::object result;  // what the call returns
  uint8_t* data = nullptr;
  size_t bytes = 0;
  bool device = false;
  void* stream = nullptr;              // device: the cudaStream_t to copy on
  std::shared_ptr<Py_buffer> export_;  // a buffer-protocol export, held while rows are written
};

void CheckSize(size_t have, size_t need) {
  if (have < need) {
    RaiseInvalid(absl::StrCat("out holds ", have, " bytes; the rows need ", need,
                              " (tokens x heads x row_bytes); nothing was written"));
  }
}

void FromTorch(const py::object& t, size_t need, Out* out) {
  if (t.attr("dtype").ptr() != TorchAttr("uint8").ptr()) {
    RaiseInvalid(
        absl::StrCat("out must be uint8; got ", py::str(t.attr("dtype")).cast<std::string>(), "; nothing was written"));
  }
  if (!t.attr("is_contiguous")().cast<bool>()) RaiseInvalid("out is not contiguous; nothing was written");
  const size_t bytes = t.attr("numel")().cast<size_t>();
  CheckSize(bytes, need);
  out->data = reinterpret_cast<uint8_t*>(t.attr("data_ptr")().cast<uintptr_t>());
  out->bytes = bytes;
  out->keep = out->result = t;
  if (t.attr("is_cuda").cast<bool>()) {
    out->device = true;
    py::object device = t.attr("device");
    out->stream =
        reinterpret_cast<void*>(TorchAttr("cuda").attr("current_stream")(device).attr("cuda_stream").cast<uintptr_t>());
  }
}

Out ResolveOut(py::handle out_arg, size_t tokens, uint32_t heads, uint32_t row_bytes) {
  const size_t need = tokens * heads * static_cast<size_t>(row_bytes);
  Out out;
  if (out_arg.is_none()) {
    py::array_t<uint8_t> a(
        {static_cast<py::ssize_t>(tokens), static_cast<py::ssize_t>(heads), static_cast<py::ssize_t>(row_bytes)});
    out.data = a.mutable_data();
    out.bytes = need;
    out.keep = out.result = a;
    return out;
  }
  py::object o = py::reinterpret_borrow<py::object>(out_arg);
  if (py::isinstance<py::array>(o)) {
    py::array a = o.cast<py::array>();
    if (a.dtype().kind() != 'u' || a.itemsize() != 1) {
      RaiseInvalid(absl::StrCat("out must be uint8; got dtype ", py::str(a.dtype()).cast<std::string>(),
                                "; nothing was written"));
    }
    if (!(a.flags() & py::array::c_style)) RaiseInvalid("out is not C-contiguous; nothing was written");
    if (!a.writeable()) RaiseInvalid("out is read-only; nothing was written");
    CheckSize(static_cast<size_t>(a.nbytes()), need);
    out.data = static_cast<uint8_t*>(a.mutable_data());
    out.bytes = static_cast<size_t>(a.nbytes());
    out.keep = out.result = o;
    return out;
  }
  if (IsTorchTensor(o)) {
    FromTorch(o, need, &out);
    return out;
  }
  if (py::hasattr(o, "__cuda_array_interface__")) {
    py::dict cai = o.attr("__cuda_array_interface__");
    if (cai["typestr"].cast<std::string>() != "|u1") RaiseInvalid("out (__cuda_array_interface__) must be |u1 (uint8)");
    if (cai.contains("strides") && !cai["strides"].is_none())
      RaiseInvalid("out is not contiguous; nothing was written");
    py::tuple data = cai["data"];
    if (data[1].cast<bool>()) RaiseInvalid("out is read-only; nothing was written");
    size_t bytes = 1;
    for (auto d : cai["shape"].cast<py::tuple>()) bytes *= d.cast<size_t>();
    CheckSize(bytes, need);
    out.data = reinterpret_cast<uint8_t*>(data[0].cast<uintptr_t>());
    out.bytes = bytes;
    out.device = true;
    if (cai.contains("stream") && !cai["stream"].is_none()) {
      const auto stream = cai["stream"].cast<uintptr_t>();
      out.stream = stream <= 2 ? nullptr : reinterpret_cast<void*>(stream);  // 1, 2: the legacy/per-thread default
    }
    out.keep = out.result = o;
    return out;
  }
  if (PyObject_CheckBuffer(o.ptr())) {
    // The export is held until the rows are written (a bytearray cannot be resized, an mmap not
    // closed, meanwhile); released with the GIL held, when the last owner lets go.
    auto view = std::shared_ptr<Py_buffer>(new Py_buffer, [](Py_buffer* v) {
      PyBuffer_Release(v);
      delete v;
    });
    if (PyObject_GetBuffer(o.ptr(), view.get(), PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      view.reset(new Py_buffer{}, [](Py_buffer* v) { delete v; });
      RaiseInvalid("out must be a writable, C-contiguous buffer of bytes; nothing was written");
    }
    const bool bytes_format = view->format == nullptr || std::strcmp(view->format, "B") == 0 ||
                              std::strcmp(view->format, "b") == 0 || std::strcmp(view->format, "c") == 0;
    if (!bytes_format) RaiseInvalid("out must hold bytes (uint8); nothing was written");
    CheckSize(static_cast<size_t>(view->len), need);
    out.data = static_cast<uint8_t*>(view->buf);
    out.bytes = static_cast<size_t>(view->len);
    out.export_ = std::move(view);
    out.keep = out.result = o;
    return out;
  }
  if (py::hasattr(o, "__dlpack__")) {
    py::object t = py::module_::import("torch.utils.dlpack").attr("from_dlpack")(o);
    FromTorch(t, need, &out);
    out.result = o;
    return out;
  }
  throw py::type_error(
      "out must be a numpy array, a torch tensor, a writable buffer, or a __dlpack__ / __cuda_array_interface__ "
      "producer");
}

// ---- tables ------------------------------------------------------------------------------------

// Raw token ids as a contiguous int32 array [batch][seq_len], and whether they came from torch.
struct Tokens {
  py::array_t<int32_t, py::array::c_style | py::array::forcecast> array;
  uint32_t batch = 0, seq_len = 0;
  bool torch = false;
};

Tokens ResolveTokens(py::handle token_ids) {
  Tokens t;
  py::object obj = py::reinterpret_borrow<py::object>(token_ids);
  if (IsTorchTensor(obj)) {
    t.torch = true;
    if (obj.attr("is_cuda").cast<bool>()) obj = obj.attr("cpu")();
    obj = obj.attr("numpy")();
  }
  py::array raw = py::array::ensure(obj);
  if (!raw || (raw.dtype().kind() != 'i' && raw.dtype().kind() != 'u')) {
    RaiseInvalid("token ids must be an integer array [seq_len] or [batch, seq_len]");
  }
  if (raw.ndim() != 1 && raw.ndim() != 2) RaiseInvalid("token ids must be [seq_len] or [batch, seq_len]");
  if (raw.itemsize() > 4 || (raw.dtype().kind() == 'u' && raw.itemsize() == 4)) {  // would not fit int32 as is
    if (raw.size() > 0 &&
        (raw.attr("min")().cast<double>() < INT32_MIN || raw.attr("max")().cast<double>() > INT32_MAX)) {
      RaiseInvalid("token ids must fit in int32");
    }
  }
  t.array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(raw);
  t.batch = raw.ndim() == 2 ? static_cast<uint32_t>(raw.shape(0)) : 1;
  t.seq_len = static_cast<uint32_t>(raw.shape(raw.ndim() - 1));
  if (t.batch == 0 || t.seq_len == 0) RaiseInvalid("token ids are empty");
  return t;
}

py::object Hash(const TableHandle& table, py::handle token_ids, std::optional<int> layer) {
  Tokens t = ResolveTokens(token_ids);
  const NgramHasher& hasher = table.hasher();
  const size_t tokens = static_cast<size_t>(t.batch) * t.seq_len;
  const int heads = hasher.heads_per_layer();
  const absl::Span<const int32_t> ids(t.array.data(), tokens);
  std::vector<py::ssize_t> shape;
  py::array_t<uint32_t> out;
  if (layer) {
    const int index = hasher.LayerIndex(*layer);
    if (index < 0) Raise(absl::NotFoundError(absl::StrCat("table '", table.name(), "' has no layer ", *layer)));
    std::vector<int64_t> compressed(tokens), local(tokens * heads);
    absl::Status s;
    {
      py::gil_scoped_release release;  // (errors are raised after it: raising needs the GIL)
      s = hasher.Compress(ids, absl::MakeSpan(compressed));
      if (s.ok()) {
        hasher.HashCompressed(compressed, static_cast<int>(t.batch), static_cast<int>(t.seq_len), index,
                              absl::MakeSpan(local));
      }
    }
    Check(s);
    out = py::array_t<uint32_t>(static_cast<py::ssize_t>(local.size()));
    std::copy(local.begin(), local.end(), out.mutable_data());
    shape = {static_cast<py::ssize_t>(tokens), heads};
  } else {
    std::vector<int64_t> all;
    absl::Status s;
    {
      py::gil_scoped_release release;
      s = hasher.HashAllLayers(ids, static_cast<int>(t.batch), static_cast<int>(t.seq_len), &all);
    }
    Check(s);
    out = py::array_t<uint32_t>(static_cast<py::ssize_t>(all.size()));
    std::copy(all.begin(), all.end(), out.mutable_data());
    shape = {static_cast<py::ssize_t>(tokens), static_cast<py::ssize_t>(hasher.layers().size()), heads};
  }
  // [seq_len, ...] or [batch, seq_len, ...], like the token ids.
  std::vector<py::ssize_t> full;
  if (t.array.ndim() == 2) full.push_back(t.batch);
  full.push_back(t.seq_len);
  full.insert(full.end(), shape.begin() + 1, shape.end());
  py::object reshaped = out.attr("reshape")(py::tuple(py::cast(full)));
  if (!t.torch) return reshaped;
  // torch has no uint32: int32 (every index is below 2^31: head sizes are primes of that size).
  return py::module_::import("torch").attr("from_numpy")(reshaped.attr("view")("int32"));
}

// ---- the client --------------------------------------------------------------------------------

// Set while a lookup_async future is resolved on the client's worker thread (its done-callbacks
// run there): a Client closed (or dropped) from one must not be destroyed on that thread.
thread_local bool in_async_callback = false;
struct InCallback {
  InCallback() { in_async_callback = true; }
  ~InCallback() { in_async_callback = false; }
};

class PyClient {
 public:
  PyClient(const std::string& uri, const ClientOptions& options) {
    absl::StatusOr<std::unique_ptr<Client>> c;
    {
      py::gil_scoped_release release;
      c = Client::Connect(uri, options);
    }
    Check(c.status());
    client_ = std::shared_ptr<Client>(std::move(*c));
    uri_ = uri;
  }
  ~PyClient() { Close(); }

  void Close() {
    std::shared_ptr<Client> last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = std::move(client_);
    }
    if (last == nullptr) return;
    if (in_async_callback) {
      // On the client's own worker thread (a done-callback closed it): ~Client would wait for
      // that very thread. Let another thread finish it.
      std::thread([c = std::move(last)]() mutable { c.reset(); }).detach();
      return;
    }
    // ~Client waits for queued async lookups, whose callbacks take the GIL.
    py::gil_scoped_release release;
    last.reset();
  }

  std::shared_ptr<Client> Get() {
    std::lock_guard<std::mutex> lock(mu_);
    if (client_ == nullptr) Raise(absl::FailedPreconditionError(absl::StrCat("the client for ", uri_, " is closed")));
    return client_;
  }
  bool closed() {
    std::lock_guard<std::mutex> lock(mu_);
    return client_ == nullptr;
  }
  const std::string& uri() const { return uri_; }

  std::shared_ptr<const TableHandle> OpenTable(const std::string& name, std::optional<double> timeout) {
    auto client = Get();
    const int ms = TimeoutMs(timeout);
    absl::StatusOr<std::shared_ptr<const TableHandle>> t;
    {
      py::gil_scoped_release release;
      CallTimeout bound(ms);
      t = client->OpenTable(name);
    }
    Check(t.status());
    return *t;
  }

  py::object Lookup(const std::shared_ptr<const TableHandle>& table, int layer, py::handle indices, py::handle out_arg,
                    std::optional<double> timeout) {
    auto client = Get();
    const int ms = TimeoutMs(timeout);
    Indices idx = ResolveIndices(indices, table->heads());
    const size_t tokens = idx.count / table->heads();
    Out out = ResolveOut(out_arg, tokens, table->heads(), table->row_bytes());
    const size_t need = idx.count * table->row_bytes();
    absl::Status s;
    {
      py::gil_scoped_release release;
      CallTimeout bound(ms);
      if (out.device) {
        s = client->LookupToDevice(*table, layer, static_cast<uint32_t>(tokens),
                                   absl::MakeConstSpan(idx.data, idx.count), out.data, need, out.stream);
      } else {
        s = client->Lookup(*table, layer, static_cast<uint32_t>(tokens), absl::MakeConstSpan(idx.data, idx.count),
                           absl::MakeSpan(out.data, need));
      }
    }
    Check(s);
    return out.result;
  }

  py::object LookupTokens(const std::shared_ptr<const TableHandle>& table, int layer, py::handle token_ids,
                          py::handle out_arg, std::optional<double> timeout) {
    auto client = Get();
    const int ms = TimeoutMs(timeout);
    Tokens t = ResolveTokens(token_ids);
    const size_t tokens = static_cast<size_t>(t.batch) * t.seq_len;
    Out out = ResolveOut(out_arg, tokens, table->heads(), table->row_bytes());
    if (out.device) RaiseInvalid("lookup_tokens writes host memory; hash with table.hash and lookup(out=cuda_tensor)");
    const size_t need = tokens * table->heads() * table->row_bytes();
    absl::Status s;
    {
      py::gil_scoped_release release;
      CallTimeout bound(ms);
      s = client->LookupTokens(*table, layer, absl::MakeConstSpan(t.array.data(), tokens), t.batch, t.seq_len,
                               absl::MakeSpan(out.data, need));
    }
    Check(s);
    return out.result;
  }

  void Prefetch(const std::shared_ptr<const TableHandle>& table, int layer, py::handle indices,
                std::optional<double> timeout) {
    auto client = Get();
    const int ms = TimeoutMs(timeout);
    Indices idx = ResolveIndices(indices, table->heads());
    absl::Status s;
    {
      py::gil_scoped_release release;
      CallTimeout bound(ms);
      s = client->Prefetch(*table, layer, static_cast<uint32_t>(idx.count / table->heads()),
                           absl::MakeConstSpan(idx.data, idx.count));
    }
    Check(s);
  }

  // A concurrent.futures.Future resolved (with `out`) on the client's worker thread.
  py::object LookupAsync(const std::shared_ptr<const TableHandle>& table, int layer, py::handle indices,
                         py::handle out_arg, std::optional<double> timeout) {
    auto client = Get();
    const int ms = TimeoutMs(timeout);
    Indices idx = ResolveIndices(indices, table->heads());
    const size_t tokens = idx.count / table->heads();
    Out out = ResolveOut(out_arg, tokens, table->heads(), table->row_bytes());
    if (out.device) RaiseInvalid("lookup_async writes host memory; for a CUDA tensor use lookup() on its stream");
    py::object future = py::module_::import("concurrent.futures").attr("Future")();
    future.attr("set_running_or_notify_cancel")();
    // Owned by the callback once the lookup is queued; released (with the GIL) when it has run.
    // Should queueing it throw (out of memory), this frame still owns it and frees it with the
    // GIL held.
    struct Pending {
      py::object future, result, keep_out;
      py::array keep_indices;
      std::shared_ptr<Py_buffer> keep_export;
    };
    auto owned = std::make_unique<Pending>(Pending{future, out.result, out.keep, idx.array, out.export_});
    Pending* pending = owned.get();
    const size_t need = idx.count * table->row_bytes();
    {
      py::gil_scoped_release release;
      CallTimeout bound(ms);
      client->LookupAsync(table, layer, static_cast<uint32_t>(tokens), absl::MakeConstSpan(idx.data, idx.count),
                          absl::MakeSpan(out.data, need), [pending](absl::Status status) {
                            py::gil_scoped_acquire acquire;
                            std::unique_ptr<Pending> own(pending);
                            InCallback in_callback;
                            try {
                              if (status.ok()) {
                                own->future.attr("set_result")(own->result);
                              } else {
                                own->future.attr("set_exception")(MakeError(status));
                              }
                            } catch (py::error_already_set& e) {
                              e.discard_as_unraisable("engram: a lookup_async done-callback");
                            }
                          });
    }
    owned.release();  // queued: the callback owns it now
    return future;
  }

  bool IsMapped(const std::shared_ptr<const TableHandle>& table) {
    auto client = Get();
    py::gil_scoped_release release;
    return client->IsMapped(*table);
  }

 private:
  std::mutex mu_;
  std::shared_ptr<Client> client_;
  std::string uri_;
};

py::object Dequantize(py::handle rows_arg, const TableHandle& table, py::object dtype) {
  py::object obj = py::reinterpret_borrow<py::object>(rows_arg);
  if (IsTorchTensor(obj)) {
    if (obj.attr("is_cuda").cast<bool>()) obj = obj.attr("cpu")();
    obj = obj.attr("contiguous")().attr("numpy")();
  }
  py::array a = py::array::ensure(obj);
  if (!a || a.dtype().kind() != 'u' || a.itemsize() != 1) RaiseInvalid("rows must be a uint8 array of raw rows");
  if (!(a.flags() & py::array::c_style)) a = Numpy().attr("ascontiguousarray")(a);
  auto row_dtype = ParseRowDtype(table.dtype());
  Check(row_dtype.status());
  const size_t per_token = static_cast<size_t>(table.heads()) * table.row_bytes();
  const size_t bytes = static_cast<size_t>(a.nbytes());
  if (bytes == 0 || bytes % per_token != 0) {
    RaiseInvalid(absl::StrCat(bytes, " bytes of rows: not a positive multiple of heads x row_bytes = ", per_token));
  }
  const size_t tokens = bytes / per_token;
  py::array_t<float> out({static_cast<py::ssize_t>(tokens), static_cast<py::ssize_t>(table.heads() * table.dim())});
  {
    const uint8_t* src = static_cast<const uint8_t*>(a.data());
    float* dst = out.mutable_data();
    const int64_t n_rows = static_cast<int64_t>(tokens * table.heads());
    const int dim = static_cast<int>(table.dim());
    const RowDtype rd = *row_dtype;
    py::gil_scoped_release release;
    kernels::DequantizeRows(src, n_rows, dim, rd, dst, 1);
  }
  py::module_ torch;
  try {
    torch = py::module_::import("torch");
  } catch (py::error_already_set&) {
    if (!dtype.is_none()) throw;
    return out;  // no torch: a numpy float32 array
  }
  py::object t = torch.attr("from_numpy")(out);
  if (!dtype.is_none() && !dtype.equal(torch.attr("float32"))) t = t.attr("to")(dtype);
  return t;
}

// ---- the Engram module -------------------------------------------------------------------------

class PyLayer {
 public:
  PyLayer(std::shared_ptr<PyClient> client, std::shared_ptr<const TableHandle> table, int layer,
          const std::string& weights, const std::string& variant, const std::string& device, int threads)
      : owner_(std::move(client)) {
    auto v = ParseEngramVariant(variant == "auto" ? table->module() : variant);
    Check(v.status());
    EngramLayerOptions options;
    if (device == "cpu") {
      options.device = EngramDevice::kCpu;
    } else if (device == "cuda") {
      options.device = EngramDevice::kCuda;
    } else if (device != "auto") {
      RaiseInvalid(absl::StrCat("device '", device, "' is not cpu, cuda or auto"));
    }
    options.cpu_threads = threads;
    client_ = owner_->Get();
    absl::StatusOr<std::unique_ptr<EngramLayer>> l = absl::UnknownError("unset");
    {
      py::gil_scoped_release release;
      if (*v == EngramVariant::kDsv41) {
        auto w = LoadDsv41Weights(weights, layer, static_cast<int64_t>(table->heads()) * table->dim(), threads);
        l = w.ok() ? EngramLayer::Create(client_.get(), table, layer, std::move(*w), options)
                   : absl::StatusOr<std::unique_ptr<EngramLayer>>(w.status());
      } else {
        auto w = LoadEngramWeights(weights);
        l = w.ok() ? EngramLayer::Create(client_.get(), table, layer, std::move(*w), options)
                   : absl::StatusOr<std::unique_ptr<EngramLayer>>(w.status());
      }
    }
    Check(l.status());
    layer_ = std::move(*l);
  }
  ~PyLayer() {
    py::gil_scoped_release release;
    layer_.reset();
    client_.reset();
  }

  py::object Forward(py::handle token_ids, py::handle hidden, py::handle out_arg) {
    // One forward at a time per layer (its buffers). Taken without the GIL: a thread holding it
    // gives the GIL up while it computes, and must be able to get it back.
    std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
    {
      py::gil_scoped_release release;
      lock.lock();
    }
    Tokens t = ResolveTokens(token_ids);
    py::object h = py::reinterpret_borrow<py::object>(hidden);
    const size_t values = static_cast<size_t>(t.batch) * t.seq_len * layer_->streams() * layer_->hidden_size();
    const auto ids = absl::MakeConstSpan(t.array.data(), static_cast<size_t>(t.batch) * t.seq_len);
    if (IsTorchTensor(h)) {
      py::module_ torch = py::module_::import("torch");
      const bool bf16 = h.attr("dtype").equal(torch.attr("bfloat16"));
      if (!bf16 && !h.attr("dtype").equal(torch.attr("float32"))) {
        RaiseInvalid("hidden states must be float32 (or bfloat16 for the dsv41 module)");
      }
      if (!h.attr("is_contiguous")().cast<bool>()) h = h.attr("contiguous")();
      if (h.attr("numel")().cast<size_t>() != values) {
        RaiseInvalid(absl::StrCat("hidden states hold ", h.attr("numel")().cast<size_t>(),
                                  " values; batch x seq_len x ", layer_->streams(), " streams x ",
                                  layer_->hidden_size(), " = ", values, " expected"));
      }
      py::object out = out_arg.is_none() ? torch.attr("empty_like")(h) : py::reinterpret_borrow<py::object>(out_arg);
      if (!IsTorchTensor(out) || !out.attr("dtype").equal(h.attr("dtype")) ||
          !out.attr("is_contiguous")().cast<bool>() || out.attr("numel")().cast<size_t>() != values ||
          out.attr("is_cuda").cast<bool>() != h.attr("is_cuda").cast<bool>()) {
        RaiseInvalid("out must be a contiguous tensor like hidden_states (same dtype, size and device)");
      }
      const bool cuda = h.attr("is_cuda").cast<bool>();
      void* stream = nullptr;
      if (cuda) {
        stream = reinterpret_cast<void*>(
            torch.attr("cuda").attr("current_stream")(h.attr("device")).attr("cuda_stream").cast<uintptr_t>());
      }
      const auto in_ptr = h.attr("data_ptr")().cast<uintptr_t>();
      const auto out_ptr = out.attr("data_ptr")().cast<uintptr_t>();
      absl::Status s;
      {
        py::gil_scoped_release release;
        if (bf16) {
          const absl::Span<const uint16_t> in(reinterpret_cast<const uint16_t*>(in_ptr), values);
          const absl::Span<uint16_t> o(reinterpret_cast<uint16_t*>(out_ptr), values);
          s = cuda ? layer_->Forward(ids, t.batch, t.seq_len, in, o, stream)
                   : layer_->ForwardHost(ids, t.batch, t.seq_len, in, o);
        } else {
          const absl::Span<const float> in(reinterpret_cast<const float*>(in_ptr), values);
          const absl::Span<float> o(reinterpret_cast<float*>(out_ptr), values);
          s = cuda ? layer_->Forward(ids, t.batch, t.seq_len, in, o, stream)
                   : layer_->ForwardHost(ids, t.batch, t.seq_len, in, o);
        }
      }
      Check(s);
      return out;
    }
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(h);
    if (!a || static_cast<size_t>(a.size()) != values) {
      RaiseInvalid(
          absl::StrCat("hidden states must be float32 with batch x seq_len x streams x D = ", values, " values"));
    }
    py::array_t<float> out(a.request().shape);
    absl::Status s;
    {
      const absl::Span<const float> in(a.data(), values);
      const absl::Span<float> o(out.mutable_data(), values);
      py::gil_scoped_release release;
      s = layer_->ForwardHost(ids, t.batch, t.seq_len, in, o);
    }
    Check(s);
    return out;
  }

  EngramLayer& layer() { return *layer_; }

 private:
  std::mutex mu_;
  std::shared_ptr<PyClient> owner_;
  std::shared_ptr<Client> client_;  // alive as long as the layer, even after the PyClient is closed
  std::unique_ptr<EngramLayer> layer_;
};

void RegisterErrors(py::module_& m) {
  g_error = PyErr_NewExceptionWithDoc(
      "engram.Error",
      "Base of every engram error. `code` is the status code's name (e.g. 'NOT_FOUND'), `message` the text\n"
      "(the daemon's own where it came from the daemon).",
      PyExc_RuntimeError, nullptr);
  m.attr("Error") = py::handle(g_error);
  struct Kind {
    absl::StatusCode code;
    const char* name;
    PyObject* also;
  };
  const Kind kinds[] = {
      {absl::StatusCode::kCancelled, "CancelledError", nullptr},
      {absl::StatusCode::kUnknown, "UnknownError", nullptr},
      {absl::StatusCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError},
      {absl::StatusCode::kDeadlineExceeded, "DeadlineExceededError", PyExc_TimeoutError},
      {absl::StatusCode::kNotFound, "NotFoundError", PyExc_LookupError},
      {absl::StatusCode::kAlreadyExists, "AlreadyExistsError", nullptr},
      {absl::StatusCode::kPermissionDenied, "PermissionDeniedError", PyExc_PermissionError},
      {absl::StatusCode::kResourceExhausted, "ResourceExhaustedError", nullptr},
      {absl::StatusCode::kFailedPrecondition, "FailedPreconditionError", nullptr},
      {absl::StatusCode::kAborted, "AbortedError", nullptr},
      {absl::StatusCode::kOutOfRange, "OutOfRangeError", nullptr},
      {absl::StatusCode::kUnimplemented, "UnimplementedError", nullptr},
      {absl::StatusCode::kInternal, "InternalError", nullptr},
      {absl::StatusCode::kUnavailable, "UnavailableError", PyExc_ConnectionError},
      {absl::StatusCode::kDataLoss, "DataLossError", nullptr},
      {absl::StatusCode::kUnauthenticated, "UnauthenticatedError", nullptr},
  };
  for (const Kind& k : kinds) {
    PyObject* bases = k.also != nullptr ? PyTuple_Pack(2, g_error, k.also) : PyTuple_Pack(1, g_error);
    PyObject* type = PyErr_NewException(absl::StrCat("engram.", k.name).c_str(), bases, nullptr);
    Py_DECREF(bases);
    ErrorTypes()[k.code] = type;
    m.attr(k.name) = py::handle(type);
  }
}

}  // namespace
}  // namespace engram::python

PYBIND11_MODULE(_engram, m) {
  using namespace engram;          // NOLINT
  using namespace engram::python;  // NOLINT
  m.doc() = "libengram_client for Python: the compiled half of the `engram` package (use `import engram`).";
  RegisterErrors(m);

  py::class_<TableHandle, std::shared_ptr<TableHandle>>(m, "Table", R"doc(
A table's layout as engramd describes it (from Client.open_table).

Attributes: name, dtype ('f32' | 'bf16' | 'f16' | 'fp8_e4m3_ue8m0x32'), dim (elements per row),
row_bytes, heads (rows per token and layer), layer_ids, module ('demo' | 'dsv41'), and the hash
settings max_ngram, heads_per_ngram, seed, pad_id, compressed_vocab, vocab_per_ngram,
dead_token_id (None when the table has no dead positions).)doc")
      .def_property_readonly("name", &TableHandle::name)
      .def_property_readonly("dtype", &TableHandle::dtype)
      .def_property_readonly("dim", &TableHandle::dim)
      .def_property_readonly("row_bytes", &TableHandle::row_bytes)
      .def_property_readonly("heads", &TableHandle::heads)
      .def_property_readonly("layer_ids", &TableHandle::layer_ids)
      .def_property_readonly("module", &TableHandle::module)
      .def_property_readonly("max_ngram", [](const TableHandle& t) { return t.hasher().config().max_ngram; })
      .def_property_readonly("heads_per_ngram",
                             [](const TableHandle& t) { return t.hasher().config().heads_per_ngram; })
      .def_property_readonly("seed", [](const TableHandle& t) { return t.hasher().config().seed; })
      .def_property_readonly("pad_id", [](const TableHandle& t) { return t.hasher().config().pad_id; })
      .def_property_readonly("compressed_vocab",
                             [](const TableHandle& t) { return t.hasher().config().compressed_vocab; })
      .def_property_readonly("vocab_per_ngram",
                             [](const TableHandle& t) { return t.hasher().config().vocab_per_ngram; })
      .def_property_readonly("dead_token_id", [](const TableHandle& t) { return t.hasher().config().dead_token_id; })
      .def("hash", &Hash, py::arg("token_ids"), py::arg("layer") = py::none(), R"doc(
hash(token_ids, layer=None) -> indices

Head-local row indices of raw token ids ([seq_len] or [batch, seq_len], any integer dtype) with
this table's layout, exactly as engramd and the C++ hasher compute them (dead positions included).
With `layer`: shape [..., heads]; without: [..., len(layer_ids), heads]. A numpy input gives
uint32, a torch input gives an int32 tensor (torch has no uint32; every index is below 2^31).)doc")
      .def("__repr__", [](const TableHandle& t) {
        return absl::StrCat("<engram.Table '", t.name(), "' ", t.dtype(), " dim=", t.dim(), " heads=", t.heads(),
                            " module=", t.module(), ">");
      });

  py::class_<PyClient, std::shared_ptr<PyClient>>(m, "Client", R"doc(
A connection to engramd (use engram.connect). Thread-safe: calls from several Python threads are
serialized per Client (open one Client per thread for parallel lookups). A context manager: the
with-block closes it. When the daemon goes away, calls fail with UnavailableError within about
connect_timeout (sooner over unix://) while a background thread reconnects with backoff; once the
daemon is back the next call goes through (its tables reopened).)doc")
      .def(py::init([](const std::string& uri, uint64_t shm_data_bytes, double timeout, double connect_timeout,
                       double reconnect_backoff, double reconnect_backoff_max, bool map_tables) {
             ClientOptions o;
             o.shm_data_bytes = shm_data_bytes;
             o.timeout_ms = TimeoutMs(timeout);
             o.connect_timeout_ms = TimeoutMs(connect_timeout);
             o.reconnect_backoff_ms = TimeoutMs(reconnect_backoff);
             o.reconnect_backoff_max_ms = TimeoutMs(reconnect_backoff_max);
             o.map_tables = map_tables;
             return std::make_shared<PyClient>(uri, o);
           }),
           py::arg("uri"), py::kw_only(), py::arg("shm_data_bytes") = 64ull << 20, py::arg("timeout") = 30.0,
           py::arg("connect_timeout") = 1.0, py::arg("reconnect_backoff") = 0.05,
           py::arg("reconnect_backoff_max") = 2.0, py::arg("map_tables") = true)
      .def_property_readonly("uri", &PyClient::uri)
      .def_property_readonly("closed", &PyClient::closed)
      .def("open_table", &PyClient::OpenTable, py::arg("name"), py::kw_only(), py::arg("timeout") = py::none(),
           "open_table(name, *, timeout=None) -> Table: the table's layout from the daemon.")
      .def("lookup", &PyClient::Lookup, py::arg("table"), py::arg("layer"), py::arg("indices"),
           py::arg("out") = py::none(), py::kw_only(), py::arg("timeout") = py::none(), R"doc(
lookup(table, layer, indices, out=None, *, timeout=None) -> out

Rows of head-local `indices` ([tokens, heads] or flat, integers; e.g. table.hash(ids, layer)) of
one layer. Written into `out` when given: a contiguous, writable uint8 buffer of at least
tokens x heads x row_bytes bytes, any shape (a numpy array, a torch tensor, a buffer-protocol
object or a DLPack producer), checked before anything is written; else into a new uint8 numpy
array [tokens, heads, row_bytes]. A CUDA tensor (or __cuda_array_interface__ object) is filled
through LookupToDevice on the tensor's current torch stream. Over unix:// a table the daemon
holds resident is gathered straight into `out` from a read-only mapping; otherwise the rows are
copied once from the shared-memory arena (or the gRPC reply). `timeout` in seconds bounds this
call (default: the client's). The GIL is released while it waits.)doc")
      .def("lookup_tokens", &PyClient::LookupTokens, py::arg("table"), py::arg("layer"), py::arg("token_ids"),
           py::arg("out") = py::none(), py::kw_only(), py::arg("timeout") = py::none(),
           "lookup_tokens(table, layer, token_ids, out=None, *, timeout=None) -> out: hashes raw token ids\n"
           "([seq_len] or [batch, seq_len]) here and looks up one layer, as lookup() does.")
      .def("prefetch", &PyClient::Prefetch, py::arg("table"), py::arg("layer"), py::arg("indices"), py::kw_only(),
           py::arg("timeout") = py::none(),
           "prefetch(table, layer, indices, *, timeout=None): asks the daemon to stage these rows (for a later\n"
           "layer, when a step starts); returns when the request is taken, not when the rows are staged.")
      .def("lookup_async", &PyClient::LookupAsync, py::arg("table"), py::arg("layer"), py::arg("indices"),
           py::arg("out") = py::none(), py::kw_only(), py::arg("timeout") = py::none(), R"doc(
lookup_async(table, layer, indices, out=None, *, timeout=None) -> concurrent.futures.Future

lookup() run by this Client's one worker thread, in the order calls are made; the future's result
is `out`, or it carries the engram.Error. Keep `out` untouched until the future is done. Callbacks
(add_done_callback) run on the worker thread: a callback must not wait for another call of the same
Client (the one worker would wait on itself) nor close it. Host buffers only.)doc")
      .def("is_mapped", &PyClient::IsMapped, py::arg("table"),
           "is_mapped(table) -> bool: True when lookups of `table` gather from a read-only mapping here.")
      .def("close", &PyClient::Close, "close(): ends the connection (after queued async lookups). Idempotent.")
      .def("__enter__", [](std::shared_ptr<PyClient> self) { return self; })
      .def("__exit__", [](PyClient& self, py::args) { self.Close(); })
      .def("__repr__", [](PyClient& self) {
        return absl::StrCat("<engram.Client ", self.uri(), self.closed() ? " (closed)" : "", ">");
      });

  m.def("dequantize", &Dequantize, py::arg("rows"), py::arg("table"), py::arg("dtype") = py::none(), R"doc(
dequantize(rows, table, dtype=None) -> tensor [tokens, heads * dim]

Raw rows (uint8, tokens x heads x row_bytes bytes, as lookup() returns them) as numbers, decoded by
the same functions the C++ code uses (fp8 rows: each value times its block's power-of-two scale).
float32 by default; `dtype=torch.bfloat16` converts after. A torch tensor when torch is installed,
else a numpy float32 array.)doc");

  py::class_<PyLayer, std::shared_ptr<PyLayer>>(m, "EngramLayer", R"doc(
EngramLayer(client, table, layer, weights, *, variant='auto', device='auto', threads=0)

One Engram layer: hashes token ids, fetches the layer's rows through `client`, dequantizes them and
runs the module on the CPU twin (or CUDA where built and present). variant 'demo' (weights: a
safetensors file with the reference demo's names; forward returns Y = V + ShortConv(V)) or
'dsv41' (weights: the Hugging Face checkpoint directory; forward returns the updated streams
h_k + g_k * v); 'auto' takes the table's recorded module.)doc")
      .def(py::init<std::shared_ptr<PyClient>, std::shared_ptr<const TableHandle>, int, const std::string&,
                    const std::string&, const std::string&, int>(),
           py::arg("client"), py::arg("table"), py::arg("layer"), py::arg("weights"), py::kw_only(),
           py::arg("variant") = "auto", py::arg("device") = "auto", py::arg("threads") = 0)
      .def("forward", &PyLayer::Forward, py::arg("token_ids"), py::arg("hidden_states"), py::arg("out") = py::none(),
           R"doc(
forward(token_ids, hidden_states, out=None) -> tensor

token_ids [batch, seq_len] (or [seq_len]); hidden_states [batch, seq_len, streams, D] float32 (or
bfloat16, dsv41), a torch tensor (CPU; CUDA where the library has a device) or a numpy array. The
result has the hidden states' shape, dtype and device; `out` may be given (dsv41: it may be
hidden_states itself, an in-place update).)doc")
      .def_property_readonly("variant", [](PyLayer& l) { return std::string(EngramVariantName(l.layer().variant())); })
      .def_property_readonly("device",
                             [](PyLayer& l) { return l.layer().device() == EngramDevice::kCuda ? "cuda" : "cpu"; })
      .def_property_readonly("streams", [](PyLayer& l) { return l.layer().streams(); })
      .def_property_readonly("hidden_size", [](PyLayer& l) { return l.layer().hidden_size(); })
      .def_property_readonly("embed_width", [](PyLayer& l) { return l.layer().embed_width(); })
      .def_property_readonly("layer_id", [](PyLayer& l) { return l.layer().layer_id(); });
}
