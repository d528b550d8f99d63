// engramd's HBM tier at start-up and while serving: splits --hbm-budget over every served table
// layer (by rows), creates each layer's slot store and HbmTier, and runs the promoter thread that
// steps them. Without a GPU (or built without CUDA) the tier stays off and says why, unless the
// host store was asked for (--hbm-store host: the tier's protocol on host memory, for testing).
#ifndef ENGRAM_SERVICE_HBM_SETUP_H_
#define ENGRAM_SERVICE_HBM_SETUP_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/engine.h"

namespace engram {

struct HbmSetupOptions {
  uint64_t budget_bytes = 0;
  int gpu = 0;
  std::string store = "auto";  // auto|cuda|host
  int step_ms = 20;
  size_t samples_per_step = 16384;
  size_t max_moves = 4096;
};

// Checks the flags alone (before tables load): the store name and the step interval.
absl::Status CheckHbmOptions(const HbmSetupOptions& options);

// Attaches HBM tiers to the engine's tables. Returns whether the tier is on; when it is off the
// reason was logged (WARN if a budget was asked for). An error: the tier was asked for explicitly
// (--hbm-store cuda|host) and cannot be built.
absl::StatusOr<bool> SetUpHbm(const HbmSetupOptions& options, Engine* engine);

// Steps every attached HBM tier every `step_ms` until Stop.
class HbmPromoter {
 public:
  HbmPromoter(Engine* engine, int step_ms);
  ~HbmPromoter();
  void Stop();

 private:
  void Loop();
  std::vector<HbmTier*> tiers_;
  std::vector<std::string> names_;
  int step_ms_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_HBM_SETUP_H_
