// A small command-line flag parser shared by engramd, engramctl and engram-bench: `--name value`
// or `--name=value`, booleans as `--name`/`--no-name`, repeatable string lists, and a --help that
// lists every flag with its default. Not thread-safe; used once at start-up.
#ifndef ENGRAM_SERVICE_CLI_FLAGS_H_
#define ENGRAM_SERVICE_CLI_FLAGS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace engram {

class FlagSet {
 public:
  // `usage` is printed above the flag list (what the command does, how it is called).
  FlagSet(std::string program, std::string usage);

  void String(const std::string& name, std::string* target, const std::string& help);
  void StringList(const std::string& name, std::vector<std::string>* target, const std::string& help);
  void Int(const std::string& name, int64_t* target, const std::string& help);
  void Double(const std::string& name, double* target, const std::string& help);
  void Bool(const std::string& name, bool* target, const std::string& help);

  // Parses argv[first..argc). Non-flag arguments go to `positional` (an error if it is null).
  // Returns InvalidArgument naming the bad flag; sets help_requested() on --help / -h.
  absl::Status Parse(int argc, char** argv, int first, std::vector<std::string>* positional);
  bool help_requested() const { return help_requested_; }
  std::string Help() const;

 private:
  struct Flag {
    std::string name, help, default_text;
    bool is_bool = false;
    std::function<absl::Status(const std::string&)> set;
  };
  const Flag* Find(const std::string& name) const;

  std::string program_, usage_;
  std::vector<Flag> flags_;
  bool help_requested_ = false;
};

// Parses a byte size such as 4096, 64K, 512M, 2G, 1.5T (binary units). Errors name the text.
absl::Status ParseBytes(const std::string& text, uint64_t* out);

// Exits with the help (code 0) or the error and a hint (code 2) when parsing did not succeed.
// Returns only when the command should go on.
void ParseOrExit(FlagSet& flags, int argc, char** argv, int first, std::vector<std::string>* positional);

}  // namespace engram

#endif  // ENGRAM_SERVICE_CLI_FLAGS_H_
