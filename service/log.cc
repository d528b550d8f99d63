#include "service/log.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace engram {
namespace {

template <typename Fields>
void Emit(absl::string_view level, absl::string_view event, const Fields& fields) {
  std::string line = absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
                                  " ", level, " event=", event);
  for (const auto& [key, value] : fields) {
    const bool quote = value.empty() || value.find_first_of(" \"=\t") != std::string::npos;
    if (quote) {
      std::string escaped;
      for (char c : value) {
        if (c == '"' || c == '\\') escaped.push_back('\\');
        escaped.push_back(c == '\n' ? ' ' : c);
      }
      absl::StrAppend(&line, " ", key, "=\"", escaped, "\"");
    } else {
      absl::StrAppend(&line, " ", key, "=", value);
    }
  }
  line.push_back('\n');
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace

void LogFields(absl::string_view level, absl::string_view event, const std::vector<LogField>& fields) {
  Emit(level, event, fields);
}

void LogInfo(absl::string_view event, std::initializer_list<LogField> fields) { Emit("INFO", event, fields); }
void LogWarn(absl::string_view event, std::initializer_list<LogField> fields) { Emit("WARN", event, fields); }
void LogError(absl::string_view event, std::initializer_list<LogField> fields) { Emit("ERROR", event, fields); }

}  // namespace engram
