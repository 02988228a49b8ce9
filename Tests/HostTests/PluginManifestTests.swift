// Unit tests for plugin manifest parsing and validation.
import Foundation
import Testing

@testable import Host

@Suite struct PluginManifestTests {
    let directory = "/srv/plugins.d/echo"
    let file = "/srv/plugins.d/echo/plugin.yaml"

    func parse(_ text: String) throws -> PluginManifest {
        try PluginManifest.parse(text, file: file, directory: directory)
    }

    func problems(_ text: String) -> [String] {
        do {
            _ = try parse(text)
            return []
        } catch let error as ConfigProblems {
            return error.problems.map(\.description)
        } catch {
            return ["unexpected \(error)"]
        }
    }

    @Test func parsesEveryKey() throws {
        let manifest = try parse(
            """
            name: echo
            version: 1.2.3
            abi: 1
            library: lib/libecho.so
            sha256: \(String(repeating: "ab", count: 32))
            description: Echo
            toolchain: swift-6.3.1
            config:
              greeting: hi
              retries: 3
              nested: {on: true}
            """)
        #expect(manifest.name == "echo")
        #expect(manifest.version == "1.2.3")
        #expect(manifest.abi == 1)
        #expect(manifest.library == "lib/libecho.so")
        #expect(manifest.sha256 == String(repeating: "ab", count: 32))
        #expect(manifest.toolchain == "swift-6.3.1")
        let config = try JSONSerialization.jsonObject(with: manifest.configJSON) as? [String: Any]
        #expect(config?["greeting"] as? String == "hi")
        #expect(config?["retries"] as? Int == 3)
        #expect((config?["nested"] as? [String: Any])?["on"] as? Bool == true)
    }

    @Test func reportsEveryMissingRequiredKeyWithFileAndKey() {
        let found = problems("description: nothing else\n")
        #expect(found.count == 4)
        for key in ["name", "version", "abi", "library"] {
            #expect(found.contains("\(file): key '\(key)': is required"))
        }
    }

    @Test func rejectsUnknownKeysAndWrongTypesWithLineNumbers() {
        let found = problems("name: echo\nversion: 1.0.0\nabi: two\nlibrary: libecho.so\nlibary: typo.so\n")
        #expect(found.contains { $0.hasPrefix("\(file):3: key 'abi': must be an integer") })
        #expect(found.contains { $0.hasPrefix("\(file):5: key 'libary': unknown key") })
    }

    @Test func aConfigNumberJSONCannotHoldIsNamedByItsKey() {
        let found = problems("name: echo\nversion: 1\nabi: 1\nlibrary: a.so\nconfig: {ok: 1, nested: {ratio: .nan}, list: [1, .inf]}\n")
        #expect(found.count == 2)
        #expect(found.contains { $0.hasPrefix("\(file):5: key 'config.nested.ratio': must be a finite number") })
        #expect(found.contains { $0.contains("key 'config.list[1]': must be a finite number") })
    }

    @Test func nameMustMatchDirectoryAndBePlain() {
        #expect(problems("name: other\nversion: 1\nabi: 1\nlibrary: a.so\n").first?.contains("must equal the plugin's directory name") == true)
        #expect(problems("name: Echo!\nversion: 1\nabi: 1\nlibrary: a.so\n").first?.contains("must match [a-z0-9]") == true)
        #expect(PluginManifest.isValidName("alexa-skill_2"))
        #expect(!PluginManifest.isValidName("-leading"))
        #expect(!PluginManifest.isValidName(String(repeating: "a", count: 65)))
    }

    @Test func libraryMustStayInsideThePluginDirectory() {
        #expect(problems("name: echo\nversion: 1\nabi: 1\nlibrary: ../other/lib.so\n").first?.contains("must stay inside") == true)
        #expect(problems("name: echo\nversion: 1\nabi: 1\nlibrary: /usr/lib/lib.so\n").first?.contains("must be a path relative") == true)
    }

    @Test func sha256MustBeLowerCaseHex() {
        #expect(problems("name: echo\nversion: 1\nabi: 1\nlibrary: a.so\nsha256: ABC\n").first?.contains("64 lower-case hex digits") == true)
    }

    @Test func malformedYAMLIsOneProblem() {
        let found = problems("name: [unclosed\n")
        #expect(found.count == 1)
        #expect(found.first?.contains("not valid YAML") == true)
        #expect(found.first?.contains("\n") == false)
    }

    @Test func documentMustBeAMapping() {
        #expect(problems("- a\n- b\n").first?.contains("must be a mapping") == true)
    }
}
