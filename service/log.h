// Structured logging: one line per event, `time level event=... key=value ...`, to stderr.
// Thread-safe (each line is written with one call). Not for per-row hot paths.
#ifndef ENGRAM_SERVICE_LOG_H_
#define ENGRAM_SERVICE_LOG_H_

#include <initializer_list>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>
#include <vector>

namespace engram {

using LogField = std::pair<absl::string_view, std::string>;

void LogInfo(absl::string_view event, std::initializer_list<LogField> fields = {});
void LogWarn(absl::string_view event, std::initializer_list<LogField> fields = {});
void LogError(absl::string_view event, std::initializer_list<LogField> fields = {});
// For field lists built at run time.
void LogFields(absl::string_view level, absl::string_view event, const std::vector<LogField>& fields);

}  // namespace engram

#endif  // ENGRAM_SERVICE_LOG_H_
