# A folder tree of unbounded depth: a viewer of a folder views everything below it.
# Recursion terminates on any data, cycles included.

actor User {}

resource Folder {
  roles = ["viewer", "editor"];
  permissions = ["view", "edit"];
  relations = { parent: Folder };

  "viewer" if "viewer" on "parent";
  "editor" if "editor" on "parent";
  "viewer" if "editor";

  "view" if "viewer";
  "edit" if "editor";
}

resource Document {
  permissions = ["view", "edit"];
  relations = { folder: Folder };

  "view" if "view" on "folder";
  "edit" if "edit" on "folder";
}

test "viewers see the whole subtree" {
  setup {
    has_relation(Folder{"b"}, "parent", Folder{"a"});
    has_relation(Folder{"c"}, "parent", Folder{"b"});
    has_relation(Folder{"d"}, "parent", Folder{"c"});
    has_relation(Document{"report"}, "folder", Folder{"d"});
    has_role(User{"alice"}, "viewer", Folder{"b"});
  }
  assert allow(User{"alice"}, "view", Folder{"b"});
  assert allow(User{"alice"}, "view", Folder{"d"});
  assert allow(User{"alice"}, "view", Document{"report"});
  assert_not allow(User{"alice"}, "view", Folder{"a"});
  assert_not allow(User{"alice"}, "edit", Document{"report"});
}

test "a cycle in the folder data terminates with the right answer" {
  setup {
    has_relation(Folder{"x"}, "parent", Folder{"y"});
    has_relation(Folder{"y"}, "parent", Folder{"z"});
    has_relation(Folder{"z"}, "parent", Folder{"x"});
    has_relation(Folder{"w"}, "parent", Folder{"x"});
    has_role(User{"bob"}, "editor", Folder{"y"});
  }
  assert allow(User{"bob"}, "edit", Folder{"x"});
  assert allow(User{"bob"}, "view", Folder{"z"});
  assert allow(User{"bob"}, "view", Folder{"w"});
  assert_not allow(User{"carol"}, "view", Folder{"x"});
}
